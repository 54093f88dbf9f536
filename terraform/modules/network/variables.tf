variable "name" {
  description = "Prefix of every name and Name tag."
  type        = string
}

variable "vpc_cidr" {
  description = "The VPC's IPv4 range; the internal ports (AMI, FastAGI, lock service, control plane, metrics) are open to it only."
  type        = string
}

variable "availability_zones" {
  description = "Exactly two availability zones: one public and one private subnet in each."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) == 2
    error_message = "Give exactly two availability zones."
  }
}

variable "carrier_networks" {
  description = "The carriers' signalling networks: the only sources of SIP (5060 UDP and TCP) from outside the VPC."
  type        = list(string)
}

variable "media_networks" {
  description = "Where RTP may come from (the carriers' media gateways)."
  type        = list(string)
}

variable "rtp_port_min" {
  description = "First UDP port of Asterisk's RTP range."
  type        = number
}

variable "rtp_port_max" {
  description = "Last UDP port of Asterisk's RTP range."
  type        = number
}

variable "internal_ports" {
  description = "TCP ports open between the nodes, from the VPC's range only: name => port."
  type        = map(number)
}

variable "admin_networks" {
  description = "Networks allowed to reach SSH (22/tcp) on the nodes; empty: no SSH rule."
  type        = list(string)
}
