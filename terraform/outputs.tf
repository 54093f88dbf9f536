output "carrier_failover_list" {
  description = "The core nodes' Elastic IPs, first to last: the carrier's list of destinations for the center's numbers, SIP on port 5060 (UDP or TCP)."
  value       = module.core.carrier_failover_list
}

output "core_nodes" {
  description = "The core nodes in failover order: instance id, zone, private and public address."
  value       = module.core.nodes
}

output "core_private_ips" {
  value = module.core.private_ips
}

output "extra_autoscaling_group_name" {
  description = "The Auto Scaling group the autoscaler's AWS executor drives."
  value       = module.extra.autoscaling_group_name
}

output "extra_autoscaling_group_arn" {
  value = module.extra.autoscaling_group_arn
}

output "extra_lifecycle_hook_name" {
  description = "The termination lifecycle hook the autoscaler completes (CompleteLifecycleAction) once a node is drained."
  value       = module.extra.lifecycle_hook_name
}

output "extra_lifecycle_hook_timeout_seconds" {
  value = module.extra.lifecycle_hook_timeout_seconds
}

output "autoscaler_policy_json" {
  description = "What the core nodes' role may do in Auto Scaling."
  value       = module.iam.autoscaler_policy_json
}

output "mysql_address" {
  description = "The fleet store's host (store.url = mysql://USER:PASSWORD@HOST:3306/DB)."
  value       = module.data.mysql_address
}

output "redis_primary_address" {
  description = "The lock service's Redis (lock_service.redis_url = redis://HOST:6379/0 on the core nodes)."
  value       = module.data.redis_primary_address
}

output "vpc_id" {
  value = module.network.vpc_id
}
