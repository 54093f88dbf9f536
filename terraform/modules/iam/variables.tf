variable "name" {
  description = "Prefix of every name."
  type        = string
}

variable "autoscaling_group_arn" {
  description = "The extra nodes' Auto Scaling group: the only group the autoscaler may change."
  type        = string
}
