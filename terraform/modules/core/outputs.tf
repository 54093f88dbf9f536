output "carrier_failover_list" {
  description = "The core nodes' Elastic IPs in failover order: give them to the carrier as its list of destinations, first to last."
  value       = aws_eip.core[*].public_ip
}

output "nodes" {
  description = "The core nodes in failover order."
  value = [
    for i, instance in aws_instance.core : {
      instance_id       = instance.id
      availability_zone = instance.availability_zone
      subnet_id         = instance.subnet_id
      private_ip        = local.private_ips[i]
      public_ip         = aws_eip.core[i].public_ip
    }
  ]
}

output "private_ips" {
  description = "The core nodes' fixed private addresses, in failover order."
  value       = local.private_ips
}
