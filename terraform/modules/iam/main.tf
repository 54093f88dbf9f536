# The autoscaler runs in the control plane, which runs on the core nodes, so the core
# nodes' instance profile carries its permissions. It may change one Auto Scaling group —
# the extra nodes' — and read the groups and instances (those two reads have no
# resource-level permissions in IAM, hence "*").

resource "aws_iam_role" "core" {
  name        = "${var.name}-core"
  description = "callfleet core nodes: the control plane's autoscaler (AWS executor)"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "ec2.amazonaws.com" }
    }]
  })
}

locals {
  # Written with jsonencode rather than a policy-document data source so that the
  # statements are known at plan time and `terraform test` can read them.
  autoscaler_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid    = "ChangeOwnGroupOnly"
        Effect = "Allow"
        Action = [
          "autoscaling:SetDesiredCapacity",
          "autoscaling:TerminateInstanceInAutoScalingGroup",
          "autoscaling:CompleteLifecycleAction",
          "autoscaling:SetInstanceProtection",
        ]
        Resource = var.autoscaling_group_arn
      },
      {
        Sid    = "ReadGroups"
        Effect = "Allow"
        Action = [
          "autoscaling:DescribeAutoScalingGroups",
          "autoscaling:DescribeAutoScalingInstances",
        ]
        Resource = "*"
      },
    ]
  }
}

resource "aws_iam_role_policy" "autoscaler" {
  name   = "${var.name}-autoscaler"
  role   = aws_iam_role.core.id
  policy = jsonencode(local.autoscaler_policy)
}

resource "aws_iam_instance_profile" "core" {
  name = "${var.name}-core"
  role = aws_iam_role.core.name
}
