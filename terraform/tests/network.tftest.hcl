# The network module on its own: two zones, and who may reach which port.

mock_provider "aws" {}

variables {
  name               = "callfleet"
  vpc_cidr           = "10.40.0.0/16"
  availability_zones = ["eu-central-1a", "eu-central-1b"]
  carrier_networks   = ["192.0.2.0/28", "203.0.113.64/27"]
  media_networks     = ["198.51.100.0/24"]
  rtp_port_min       = 10000
  rtp_port_max       = 20000
  internal_ports = {
    "Asterisk manager interface" = 5038
    "FastAGI"                    = 4573
    "lock service"               = 7070
    "control plane"              = 8080
  }
  admin_networks = []
}

run "security_groups" {
  command = plan

  module {
    source = "./modules/network"
  }

  assert {
    condition     = aws_security_group_rule.sip_udp.cidr_blocks == var.carrier_networks && aws_security_group_rule.sip_tcp.cidr_blocks == var.carrier_networks
    error_message = "SIP from outside must come from exactly the carriers' networks."
  }

  assert {
    condition = alltrue([
      for r in [aws_security_group_rule.sip_udp, aws_security_group_rule.sip_tcp] :
      r.type == "ingress" && r.from_port == 5060 && r.to_port == 5060
    ]) && aws_security_group_rule.sip_udp.protocol == "udp" && aws_security_group_rule.sip_tcp.protocol == "tcp"
    error_message = "The carriers' rules open 5060 over UDP and TCP."
  }

  assert {
    condition     = alltrue([for r in aws_security_group_rule.sip_internal : r.cidr_blocks == tolist([var.vpc_cidr])])
    error_message = "The other SIP rules are for the VPC only."
  }

  assert {
    condition = (aws_security_group_rule.rtp.protocol == "udp" && aws_security_group_rule.rtp.from_port == 10000
    && aws_security_group_rule.rtp.to_port == 20000 && aws_security_group_rule.rtp.cidr_blocks == var.media_networks)
    error_message = "RTP 10000-20000/udp is open to the media networks."
  }

  assert {
    condition = alltrue([
      for name, port in var.internal_ports :
      aws_security_group_rule.internal[name].cidr_blocks == tolist([var.vpc_cidr]) && aws_security_group_rule.internal[name].from_port == port
    ])
    error_message = "AMI, FastAGI, the lock service and the control plane must be reachable from inside the VPC only."
  }

  assert {
    condition     = length(aws_security_group_rule.ssh) == 0
    error_message = "No SSH rule without admin networks."
  }

  assert {
    condition     = tolist([for s in aws_subnet.public : s.availability_zone]) == var.availability_zones && tolist([for s in aws_subnet.private : s.availability_zone]) == var.availability_zones
    error_message = "One public and one private subnet in each of the two zones."
  }
}
