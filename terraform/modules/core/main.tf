# The two permanent core nodes, one per availability zone, each with an Elastic IP. The
# carrier's failover list names these two addresses in this order: the first node is the
# carrier's first choice, the second its failover. Each runs the SIP balancer, the control
# plane (and with it the autoscaler), the lock service, a node-agent and Asterisk.

locals {
  private_ips = [for cidr in var.subnet_cidrs : cidrhost(cidr, 10)]
}

resource "aws_instance" "core" {
  count = 2

  ami                    = var.ami_id
  instance_type          = var.instance_type
  key_name               = var.key_name
  subnet_id              = var.subnet_ids[count.index]
  private_ip             = local.private_ips[count.index]
  vpc_security_group_ids = var.security_group_ids
  iam_instance_profile   = var.instance_profile_name
  user_data              = var.user_data

  # A core node that is stopped or replaced by mistake takes a carrier address with it.
  disable_api_termination = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = 30
    encrypted   = true
  }

  tags = {
    Name             = "${var.name}-core-${count.index + 1}"
    "callfleet:role" = "core"
  }

  lifecycle {
    # A new AMI release must not replace a core node behind the operator's back.
    ignore_changes = [ami, user_data]
  }
}

resource "aws_eip" "core" {
  count = 2

  domain   = "vpc"
  instance = aws_instance.core[count.index].id

  tags = { Name = "${var.name}-core-${count.index + 1}" }
}
