variable "name" {
  description = "Prefix of every name."
  type        = string
}

variable "vpc_id" {
  type = string
}

variable "subnet_ids" {
  description = "Private subnets in two availability zones."
  type        = list(string)
}

variable "client_security_group_ids" {
  description = "Security groups whose members may reach MySQL (3306) and Redis (6379): the nodes'."
  type        = list(string)
}

variable "db_name" {
  type = string
}

variable "db_username" {
  type = string
}

variable "db_password" {
  type      = string
  sensitive = true
}

variable "db_instance_class" {
  type = string
}

variable "db_allocated_storage" {
  description = "GiB."
  type        = number
}

variable "db_deletion_protection" {
  type = bool
}

variable "redis_node_type" {
  type = string
}
