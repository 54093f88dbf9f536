# One VPC across two availability zones. Public subnets hold the nodes: the core nodes'
# Elastic IPs are the carrier's failover list, and extra nodes get public addresses because
# a core node's balancer answers a carrier with a 302 naming the extra node, so the carrier
# calls it directly. Private subnets hold MySQL and Redis, which need no route out.

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = { Name = var.name }
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id

  tags = { Name = var.name }
}

resource "aws_subnet" "public" {
  count = 2

  vpc_id                  = aws_vpc.this.id
  availability_zone       = var.availability_zones[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, count.index)
  map_public_ip_on_launch = true

  tags = { Name = "${var.name}-public-${var.availability_zones[count.index]}" }
}

resource "aws_subnet" "private" {
  count = 2

  vpc_id            = aws_vpc.this.id
  availability_zone = var.availability_zones[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, 100 + count.index)

  tags = { Name = "${var.name}-private-${var.availability_zones[count.index]}" }
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id

  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.this.id
  }

  tags = { Name = "${var.name}-public" }
}

resource "aws_route_table_association" "public" {
  count = 2

  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

# The private subnets use the VPC's main route table (local routes only): the databases
# answer the nodes and never call out.

# --- The nodes' security group, shared by core and extra nodes (both run Asterisk; the
# core nodes also the balancer on the same SIP port). ---

resource "aws_security_group" "nodes" {
  name        = "${var.name}-nodes"
  description = "callfleet PBX nodes: SIP from carriers, RTP from media peers, internal ports from the VPC"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-nodes" }
}

# SIP from outside the VPC: the carriers' networks and nothing else.
resource "aws_security_group_rule" "sip_udp" {
  security_group_id = aws_security_group.nodes.id
  description       = "SIP over UDP from the carriers"
  type              = "ingress"
  protocol          = "udp"
  from_port         = 5060
  to_port           = 5060
  cidr_blocks       = var.carrier_networks
}

resource "aws_security_group_rule" "sip_tcp" {
  security_group_id = aws_security_group.nodes.id
  description       = "SIP over TCP from the carriers"
  type              = "ingress"
  protocol          = "tcp"
  from_port         = 5060
  to_port           = 5060
  cidr_blocks       = var.carrier_networks
}

# SIP between the nodes (a balancer's OPTIONS and forwarded requests, in-dialog requests).
resource "aws_security_group_rule" "sip_internal" {
  for_each = toset(["udp", "tcp"])

  security_group_id = aws_security_group.nodes.id
  description       = "SIP over ${upper(each.key)} inside the VPC"
  type              = "ingress"
  protocol          = each.key
  from_port         = 5060
  to_port           = 5060
  cidr_blocks       = [var.vpc_cidr]
}

resource "aws_security_group_rule" "rtp" {
  security_group_id = aws_security_group.nodes.id
  description       = "RTP from the media peers"
  type              = "ingress"
  protocol          = "udp"
  from_port         = var.rtp_port_min
  to_port           = var.rtp_port_max
  cidr_blocks       = var.media_networks
}

resource "aws_security_group_rule" "rtp_internal" {
  security_group_id = aws_security_group.nodes.id
  description       = "RTP between the nodes"
  type              = "ingress"
  protocol          = "udp"
  from_port         = var.rtp_port_min
  to_port           = var.rtp_port_max
  cidr_blocks       = [var.vpc_cidr]
}

# AMI, FastAGI, lock service, control plane, metrics: inside the VPC only.
resource "aws_security_group_rule" "internal" {
  for_each = var.internal_ports

  security_group_id = aws_security_group.nodes.id
  description       = "${each.key} inside the VPC"
  type              = "ingress"
  protocol          = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_blocks       = [var.vpc_cidr]
}

resource "aws_security_group_rule" "ssh" {
  count = length(var.admin_networks) > 0 ? 1 : 0

  security_group_id = aws_security_group.nodes.id
  description       = "SSH from the administrators networks"
  type              = "ingress"
  protocol          = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_blocks       = var.admin_networks
}

# Out: carriers (SIP, RTP), the release downloads, the AWS APIs, the databases.
resource "aws_security_group_rule" "egress" {
  security_group_id = aws_security_group.nodes.id
  description       = "everything out"
  type              = "egress"
  protocol          = "-1"
  from_port         = 0
  to_port           = 0
  cidr_blocks       = ["0.0.0.0/0"]
}
