output "vpc_id" {
  value = aws_vpc.this.id
}

output "vpc_cidr" {
  value = aws_vpc.this.cidr_block
}

output "public_subnet_ids" {
  description = "One per availability zone, in the order of var.availability_zones."
  value       = aws_subnet.public[*].id
}

output "public_subnet_cidrs" {
  value = aws_subnet.public[*].cidr_block
}

output "private_subnet_ids" {
  value = aws_subnet.private[*].id
}

output "nodes_security_group_id" {
  value = aws_security_group.nodes.id
}

output "sip_open_to" {
  description = "The networks outside the VPC that may send SIP (5060 UDP and TCP): the carriers'."
  value       = distinct(concat(aws_security_group_rule.sip_udp.cidr_blocks, aws_security_group_rule.sip_tcp.cidr_blocks))
}
