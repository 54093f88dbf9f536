# The whole cluster, applied against a mock AWS provider: the modules wired together as a
# deployment would be. Module-level details are in the other files of this folder.

mock_provider "aws" {
  override_data {
    target = data.aws_availability_zones.available
    values = { names = ["eu-central-1a", "eu-central-1b", "eu-central-1c"] }
  }

  # The provider checks the shape of some ids even under a mock.
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0" }
  }
}

# Under a mock, computed attributes are random strings: give the Elastic IPs, the group's
# ARN and the databases' host names values to compare with.
override_resource {
  target = module.core.aws_eip.core[0]
  values = { public_ip = "198.51.100.10" }
}

override_resource {
  target = module.core.aws_eip.core[1]
  values = { public_ip = "198.51.100.20" }
}

override_resource {
  target = module.extra.aws_autoscaling_group.extra
  values = { arn = "arn:aws:autoscaling:eu-central-1:123456789012:autoScalingGroup:11111111-2222-3333-4444-555555555555:autoScalingGroupName/callfleet-extra" }
}

override_resource {
  target = module.data.aws_db_instance.store
  values = { address = "callfleet-store.abc123.eu-central-1.rds.amazonaws.com" }
}

variables {
  region                   = "eu-central-1"
  carrier_networks         = ["192.0.2.0/28", "203.0.113.64/27"]
  ami_id                   = "ami-0123456789abcdef0"
  callfleet_release_url    = "https://artifacts.example.invalid/callfleet"
  callfleet_release_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
  node_token               = "node-token-0123456789abcdef"
  db_password              = "not-a-real-password"
  max_drain_seconds        = 1200
}

run "cluster" {
  assert {
    condition     = length(output.carrier_failover_list) == 2 && length(distinct(output.carrier_failover_list)) == 2
    error_message = "The carrier's failover list must name two different addresses, got ${jsonencode(output.carrier_failover_list)}."
  }

  assert {
    condition     = output.carrier_failover_list == ["198.51.100.10", "198.51.100.20"]
    error_message = "The failover list must be the Elastic IPs of core node 1 then core node 2, got ${jsonencode(output.carrier_failover_list)}."
  }

  assert {
    condition     = output.carrier_failover_list == [for node in output.core_nodes : node.public_ip]
    error_message = "The failover list must be the core nodes' addresses in the core nodes' order."
  }

  assert {
    condition     = [for node in output.core_nodes : node.subnet_id] == module.network.public_subnet_ids
    error_message = "Core node i must sit in the public subnet of availability zone i (one node per zone)."
  }

  assert {
    condition     = output.core_private_ips == ["10.40.0.10", "10.40.1.10"]
    error_message = "The core nodes' private addresses must be the fixed .10 of their subnets, got ${jsonencode(output.core_private_ips)}."
  }

  assert {
    condition     = module.network.sip_open_to == var.carrier_networks
    error_message = "SIP from outside the VPC must be open to exactly the carriers' networks, got ${jsonencode(module.network.sip_open_to)}."
  }

  assert {
    condition     = output.extra_lifecycle_hook_timeout_seconds >= var.max_drain_seconds
    error_message = "The termination hook must wait at least max_drain."
  }

  # The policy is wired to the extra nodes' group: its mutating statement names that
  # group's ARN and nothing wider.
  assert {
    condition = one([
      for s in jsondecode(output.autoscaler_policy_json).Statement : s.Resource
      if contains(s.Action, "autoscaling:TerminateInstanceInAutoScalingGroup")
    ]) == output.extra_autoscaling_group_arn
    error_message = "The autoscaler may terminate instances of its own group only."
  }

  # What the extra nodes' user data writes: role extra, the node id from the instance
  # metadata (IMDSv2), and the core nodes and the store from this deployment.
  assert {
    condition = alltrue([
      strcontains(module.extra.node_config, "role = \"extra\""),
      strcontains(module.extra.node_config, "id = \"@NODE_ID@\""),
      strcontains(module.extra.node_config, "url = \"mysql://callfleet:not-a-real-password@callfleet-store.abc123.eu-central-1.rds.amazonaws.com:3306/callfleet\""),
      strcontains(module.extra.node_config, "control_plane = \"http://10.40.0.10:8080\""),
      strcontains(module.extra.node_config, "lock_service = \"http://10.40.0.10:7070\""),
      strcontains(module.extra.node_config, "balancers = [\"10.40.0.10\",\"10.40.1.10\"]"),
      strcontains(module.extra.node_config, "allow = [\"192.0.2.0/28\",\"203.0.113.64/27\"]"),
    ])
    error_message = "The extra nodes' callfleet configuration is not what this deployment needs."
  }

  assert {
    condition = alltrue([
      strcontains(module.extra.user_data, "X-aws-ec2-metadata-token-ttl-seconds"),
      strcontains(module.extra.user_data, "meta-data/$1"),
      strcontains(module.extra.user_data, "instance_id=$(metadata instance-id)"),
      strcontains(module.extra.user_data, "s/@NODE_ID@/$instance_id/g"),
      strcontains(module.extra.user_data, "systemctl enable --now callfleet-asterisk.service callfleet-node-agent.service"),
    ])
    error_message = "The user data must read the instance id with IMDSv2, make it the node id, and start Asterisk and the node-agent."
  }
}
