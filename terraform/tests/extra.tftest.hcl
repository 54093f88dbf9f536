# The extra nodes' module on its own: the Auto Scaling group's bounds, who owns its
# desired capacity, the termination hook, and the launch template.

mock_provider "aws" {
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0" }
  }
}

variables {
  name                     = "callfleet"
  subnet_ids               = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  security_group_ids       = ["sg-0cccccccccccccccc"]
  ami_id                   = "ami-0123456789abcdef0"
  instance_type            = "c6i.large"
  max_extra                = 10
  initial_extra            = 0
  max_drain_seconds        = 900
  drain_margin_seconds     = 300
  callfleet_release_url    = "https://artifacts.example.invalid/callfleet"
  callfleet_release_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
  asterisk_install_dir     = "/opt/asterisk"
  asterisk_tarball_url     = ""
  asterisk_tarball_sha256  = ""
  store_url                = "mysql://callfleet:secret@store.internal:3306/callfleet"
  node_token               = "node-token-0123456789abcdef"
  control_plane_url        = "http://10.40.0.10:8080"
  lock_service_url         = "http://10.40.0.10:7070"
  core_private_ips         = ["10.40.0.10", "10.40.1.10"]
  carrier_networks         = ["192.0.2.0/28"]
  pool                     = "default"
  max_calls                = 100
  node_metrics_port        = 9464
  rtp_port_min             = 10000
  rtp_port_max             = 20000
}

run "group_and_hook" {
  module {
    source = "./modules/extra"
  }

  assert {
    condition     = aws_autoscaling_group.extra.min_size == 0
    error_message = "The extra nodes' group must be allowed to shrink to no node."
  }

  assert {
    condition     = aws_autoscaling_group.extra.max_size == var.max_extra
    error_message = "The group's max_size must be max_extra."
  }

  assert {
    condition     = aws_autoscaling_group.extra.protect_from_scale_in
    error_message = "New extra nodes must be protected from scale-in: only the autoscaler picks the node to remove."
  }

  assert {
    condition     = contains(aws_autoscaling_group.extra.suspended_processes, "AZRebalance")
    error_message = "Rebalancing across zones would let AWS terminate a node carrying calls."
  }

  assert {
    condition     = aws_autoscaling_lifecycle_hook.drain.lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
    error_message = "The hook must hold instances that are terminating."
  }

  assert {
    condition     = aws_autoscaling_lifecycle_hook.drain.autoscaling_group_name == aws_autoscaling_group.extra.name
    error_message = "The hook must belong to the extra nodes' group."
  }

  assert {
    condition     = aws_autoscaling_lifecycle_hook.drain.heartbeat_timeout >= var.max_drain_seconds
    error_message = "The hook's timeout (${aws_autoscaling_lifecycle_hook.drain.heartbeat_timeout} s) must cover max_drain (${var.max_drain_seconds} s)."
  }

  assert {
    condition     = aws_autoscaling_lifecycle_hook.drain.heartbeat_timeout == 1200
    error_message = "The hook's timeout must be max_drain plus the margin."
  }

  assert {
    condition     = aws_launch_template.extra.metadata_options[0].http_tokens == "required"
    error_message = "The instance metadata must be IMDSv2 only."
  }

  assert {
    condition     = aws_launch_template.extra.network_interfaces[0].associate_public_ip_address == "true"
    error_message = "Extra nodes need a public address: carriers call them directly after a 302."
  }

  assert {
    condition     = base64decode(aws_launch_template.extra.user_data) == output.user_data
    error_message = "The launch template must carry the rendered user data."
  }

  assert {
    condition     = !strcontains(output.user_data, "asterisk.tar.gz")
    error_message = "Without asterisk_tarball_url the user data downloads no Asterisk."
  }
}

# `lifecycle { ignore_changes = [desired_capacity] }` is not in a plan's output, so it is
# shown by its effect: after the group exists, a new desired capacity in the configuration
# plans no change, and the group keeps the capacity it has (the autoscaler's).
run "desired_capacity_is_left_to_the_autoscaler" {
  command = plan

  module {
    source = "./modules/extra"
  }

  variables {
    initial_extra = 3
  }

  assert {
    condition     = aws_autoscaling_group.extra.desired_capacity == 0
    error_message = "Terraform must not change the group's desired capacity once it exists (planned ${aws_autoscaling_group.extra.desired_capacity})."
  }
}

run "asterisk_from_a_tarball" {
  command = plan

  module {
    source = "./modules/extra"
  }

  variables {
    asterisk_tarball_url    = "https://artifacts.example.invalid/asterisk-22.tar.gz"
    asterisk_tarball_sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
  }

  assert {
    condition     = strcontains(output.user_data, "curl -fsSL --retry 5 -o /tmp/asterisk.tar.gz 'https://artifacts.example.invalid/asterisk-22.tar.gz'")
    error_message = "With asterisk_tarball_url the user data downloads it."
  }
}

run "a_tarball_without_its_checksum_is_refused" {
  command = plan

  module {
    source = "./modules/extra"
  }

  variables {
    asterisk_tarball_url = "https://artifacts.example.invalid/asterisk-22.tar.gz"
  }

  expect_failures = [aws_launch_template.extra]
}
