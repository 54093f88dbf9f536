output "core_instance_profile_name" {
  value = aws_iam_instance_profile.core.name
}

output "core_role_arn" {
  value = aws_iam_role.core.arn
}

output "autoscaler_policy_json" {
  description = "The autoscaler's policy, as attached to the core nodes' role."
  value       = aws_iam_role_policy.autoscaler.policy
}
