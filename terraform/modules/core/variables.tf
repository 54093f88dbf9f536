variable "name" {
  description = "Prefix of every name and Name tag."
  type        = string
}

variable "subnet_ids" {
  description = "Two public subnets, one per availability zone: core node i goes into subnet i."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) == 2
    error_message = "The core is two nodes in two subnets."
  }
}

variable "subnet_cidrs" {
  description = "The CIDRs of subnet_ids, in the same order: each node gets the fixed private address .10 of its subnet, so that extra nodes can be configured with it before the core nodes exist."
  type        = list(string)
}

variable "security_group_ids" {
  type = list(string)
}

variable "ami_id" {
  type = string
}

variable "instance_type" {
  type = string
}

variable "key_name" {
  description = "EC2 key pair for SSH; null: none."
  type        = string
  default     = null
}

variable "instance_profile_name" {
  description = "The instance profile carrying the autoscaler's permissions (the control plane runs here)."
  type        = string
}

variable "user_data" {
  description = "User data for the core nodes; null: none (see terraform/README.md: the core nodes' software is set up by the operator)."
  type        = string
  default     = null
}
