# The autoscaler's permissions on their own: changes to its own group only.

mock_provider "aws" {}

variables {
  name                  = "callfleet"
  autoscaling_group_arn = "arn:aws:autoscaling:eu-central-1:123456789012:autoScalingGroup:11111111-2222-3333-4444-555555555555:autoScalingGroupName/callfleet-extra"
}

run "autoscaler_policy" {
  command = plan

  module {
    source = "./modules/iam"
  }

  assert {
    condition = alltrue([
      for action in [
        "autoscaling:SetDesiredCapacity",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:SetInstanceProtection",
        ] : alltrue([
          for s in jsondecode(aws_iam_role_policy.autoscaler.policy).Statement :
          s.Resource == var.autoscaling_group_arn if contains(flatten([s.Action]), action)
          ]) && anytrue([
          for s in jsondecode(aws_iam_role_policy.autoscaler.policy).Statement :
          contains(flatten([s.Action]), action)
      ])
    ])
    error_message = "Every mutating action must be allowed, on the group's ARN only (never \"*\")."
  }

  assert {
    condition = sort(flatten([
      for s in jsondecode(aws_iam_role_policy.autoscaler.policy).Statement : s.Action if s.Resource == "*"
    ])) == tolist(["autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances"])
    error_message = "Only the two Describe actions, which have no resource-level permissions, may name \"*\"."
  }

  assert {
    condition     = alltrue([for s in jsondecode(aws_iam_role_policy.autoscaler.policy).Statement : s.Effect == "Allow"]) && aws_iam_instance_profile.core.role == aws_iam_role.core.name
    error_message = "The policy is attached to the role of the core nodes' instance profile."
  }
}
