variable "name" {
  description = "Prefix of every name and Name tag."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets in two availability zones (extra nodes get public addresses: carriers call them after a 302)."
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
  type    = string
  default = null
}

variable "max_extra" {
  description = "The group's max_size: the most extra nodes that can run at once (keep it ≥ the autoscaler's max_extra)."
  type        = number
}

variable "initial_extra" {
  description = "desired_capacity when the group is created; afterwards Terraform leaves it to the autoscaler."
  type        = number
  default     = 0
}

variable "max_drain_seconds" {
  description = "callfleet's autoscaler max_drain, in seconds: the longest a node drains before it is terminated anyway."
  type        = number
}

variable "drain_margin_seconds" {
  description = "Added to max_drain_seconds for the termination hook's heartbeat timeout."
  type        = number
}

variable "callfleet_release_url" {
  type = string
}

variable "callfleet_release_sha256" {
  type = string
}

variable "asterisk_install_dir" {
  type = string
}

variable "asterisk_tarball_url" {
  type = string
}

variable "asterisk_tarball_sha256" {
  type = string
}

variable "store_url" {
  description = "callfleet's store.url (mysql://…)."
  type        = string
  sensitive   = true
}

variable "node_token" {
  description = "A control-plane token with role node, for provisioning.token."
  type        = string
  sensitive   = true
}

variable "control_plane_url" {
  description = "provisioning.control_plane: http://HOST:PORT of a core node's control plane."
  type        = string
}

variable "lock_service_url" {
  description = "node.queue.lock_service: http://HOST:PORT of a core node's lock service."
  type        = string
}

variable "core_private_ips" {
  description = "The core nodes' private addresses (asterisk.balancers)."
  type        = list(string)
}

variable "carrier_networks" {
  description = "balancer.allow: the networks Asterisk takes for the carrier."
  type        = list(string)
}

variable "pool" {
  type = string
}

variable "max_calls" {
  type = number
}

variable "node_metrics_port" {
  type = number
}

variable "rtp_port_min" {
  type = number
}

variable "rtp_port_max" {
  type = number
}
