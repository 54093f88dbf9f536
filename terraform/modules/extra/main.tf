# The extra nodes: a launch template whose user data installs and starts Asterisk and the
# node-agent, and an Auto Scaling group that callfleet's autoscaler drives. Terraform sets
# the group's bounds; the autoscaler alone sets how many run and which one goes.

module "user_data" {
  source = "./user-data"

  callfleet_release_url    = var.callfleet_release_url
  callfleet_release_sha256 = var.callfleet_release_sha256
  asterisk_install_dir     = var.asterisk_install_dir
  asterisk_tarball_url     = var.asterisk_tarball_url
  asterisk_tarball_sha256  = var.asterisk_tarball_sha256
  store_url                = var.store_url
  node_token               = var.node_token
  control_plane_url        = var.control_plane_url
  lock_service_url         = var.lock_service_url
  core_private_ips         = var.core_private_ips
  carrier_networks         = var.carrier_networks
  pool                     = var.pool
  max_calls                = var.max_calls
  node_metrics_port        = var.node_metrics_port
  rtp_port_min             = var.rtp_port_min
  rtp_port_max             = var.rtp_port_max
}

resource "aws_launch_template" "extra" {
  name                   = "${var.name}-extra"
  description            = "callfleet extra node: Asterisk and the node-agent"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  key_name               = var.key_name
  update_default_version = true
  user_data              = base64encode(module.user_data.user_data)

  network_interfaces {
    associate_public_ip_address = true
    delete_on_termination       = true
    security_groups             = var.security_group_ids
  }

  # The user data reads the instance id with IMDSv2; IMDSv1 is off.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  lifecycle {
    precondition {
      condition     = var.asterisk_tarball_url == "" || var.asterisk_tarball_sha256 != ""
      error_message = "asterisk_tarball_url needs asterisk_tarball_sha256."
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name             = "${var.name}-extra"
      "callfleet:role" = "extra"
    }
  }
}

resource "aws_autoscaling_group" "extra" {
  name                = "${var.name}-extra"
  vpc_zone_identifier = var.subnet_ids

  # The core nodes carry the day without extra nodes.
  min_size         = 0
  max_size         = var.max_extra
  desired_capacity = var.initial_extra

  launch_template {
    id      = aws_launch_template.extra.id
    version = aws_launch_template.extra.latest_version
  }

  health_check_type         = "EC2"
  health_check_grace_period = 300

  # New instances are protected from scale-in, so AWS never picks a node carrying calls to
  # terminate; the autoscaler drains its chosen node and terminates that instance itself.
  protect_from_scale_in = true

  # Rebalancing across zones would terminate instances AWS chooses; only the autoscaler
  # chooses which node goes.
  suspended_processes = ["AZRebalance"]

  tag {
    key                 = "callfleet:role"
    value               = "extra"
    propagate_at_launch = true
  }

  lifecycle {
    # The autoscaler owns the number of extra nodes (SetDesiredCapacity): a `terraform
    # apply` must not reset it to initial_extra in the middle of the day.
    ignore_changes = [desired_capacity]
  }
}

# An instance leaving the group waits in Terminating:Wait until the autoscaler completes
# the lifecycle action (after the node reported `drained`, or after max_drain), or until
# this timeout: longer than max_drain, so no drain is cut short by AWS.
resource "aws_autoscaling_lifecycle_hook" "drain" {
  name                   = "${var.name}-drain"
  autoscaling_group_name = aws_autoscaling_group.extra.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_TERMINATING"
  heartbeat_timeout      = var.max_drain_seconds + var.drain_margin_seconds
  default_result         = "CONTINUE"

  lifecycle {
    precondition {
      condition     = var.max_drain_seconds + var.drain_margin_seconds <= 7200
      error_message = "max_drain_seconds + drain_margin_seconds must be at most 7200 (AWS's longest lifecycle hook timeout)."
    }
  }
}
