output "autoscaling_group_name" {
  value = aws_autoscaling_group.extra.name
}

output "autoscaling_group_arn" {
  value = aws_autoscaling_group.extra.arn
}

output "lifecycle_hook_name" {
  value = aws_autoscaling_lifecycle_hook.drain.name
}

output "lifecycle_hook_timeout_seconds" {
  value = aws_autoscaling_lifecycle_hook.drain.heartbeat_timeout
}

output "launch_template_id" {
  value = aws_launch_template.extra.id
}

output "node_config" {
  description = "callfleet's configuration as the user data writes it, before the @…@ placeholders are filled in at boot."
  value       = module.user_data.node_config
  sensitive   = true
}

output "user_data" {
  description = "The launch template's user data (a bash script), unencoded."
  value       = module.user_data.user_data
  sensitive   = true
}
