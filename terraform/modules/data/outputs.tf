output "mysql_address" {
  description = "Host name of the fleet store (moves to the standby on a failover)."
  value       = aws_db_instance.store.address
}

output "mysql_port" {
  value = aws_db_instance.store.port
}

output "redis_primary_address" {
  description = "Host name of the current Redis primary (follows failovers)."
  value       = aws_elasticache_replication_group.locks.primary_endpoint_address
}
