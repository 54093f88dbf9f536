# callfleet on AWS: a VPC across two availability zones, two core nodes with Elastic IPs
# (the carrier's failover list), extra nodes in an Auto Scaling group driven by callfleet's
# autoscaler, MySQL (the fleet store) and Redis (the lock service's leases). See README.md.

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      "callfleet:cluster" = var.name
    }
  }
}

data "aws_availability_zones" "available" {
  state = "available"
}

locals {
  availability_zones = slice(data.aws_availability_zones.available.names, 0, 2)
  media_networks     = coalesce(var.media_networks, var.carrier_networks)

  internal_ports = {
    "Asterisk manager interface" = 5038
    "FastAGI"                    = 4573
    "lock service"               = var.lock_service_port
    "control plane"              = var.control_plane_port
    "node-agent metrics"         = 9464
    "balancer metrics"           = 9465
  }

  # Extra nodes ask the first core node's control plane and lock service.
  control_plane_url = "http://${module.core.private_ips[0]}:${var.control_plane_port}"
  lock_service_url  = "http://${module.core.private_ips[0]}:${var.lock_service_port}"
  store_url         = "mysql://${var.db_username}:${urlencode(var.db_password)}@${module.data.mysql_address}:${module.data.mysql_port}/${var.db_name}"
}

module "network" {
  source = "./modules/network"

  name               = var.name
  vpc_cidr           = var.vpc_cidr
  availability_zones = local.availability_zones
  carrier_networks   = var.carrier_networks
  media_networks     = local.media_networks
  rtp_port_min       = var.rtp_port_min
  rtp_port_max       = var.rtp_port_max
  internal_ports     = local.internal_ports
  admin_networks     = var.admin_networks
}

module "iam" {
  source = "./modules/iam"

  name                  = var.name
  autoscaling_group_arn = module.extra.autoscaling_group_arn
}

module "core" {
  source = "./modules/core"

  name                  = var.name
  subnet_ids            = module.network.public_subnet_ids
  subnet_cidrs          = module.network.public_subnet_cidrs
  security_group_ids    = [module.network.nodes_security_group_id]
  ami_id                = var.ami_id
  instance_type         = var.core_instance_type
  key_name              = var.key_name
  instance_profile_name = module.iam.core_instance_profile_name
  user_data             = var.core_user_data
}

module "data" {
  source = "./modules/data"

  name                      = var.name
  vpc_id                    = module.network.vpc_id
  subnet_ids                = module.network.private_subnet_ids
  client_security_group_ids = [module.network.nodes_security_group_id]
  db_name                   = var.db_name
  db_username               = var.db_username
  db_password               = var.db_password
  db_instance_class         = var.db_instance_class
  db_allocated_storage      = var.db_allocated_storage
  db_deletion_protection    = var.db_deletion_protection
  redis_node_type           = var.redis_node_type
}

module "extra" {
  source = "./modules/extra"

  name               = var.name
  subnet_ids         = module.network.public_subnet_ids
  security_group_ids = [module.network.nodes_security_group_id]
  ami_id             = var.ami_id
  instance_type      = var.extra_instance_type
  key_name           = var.key_name

  max_extra            = var.max_extra
  max_drain_seconds    = var.max_drain_seconds
  drain_margin_seconds = var.drain_margin_seconds

  callfleet_release_url    = var.callfleet_release_url
  callfleet_release_sha256 = var.callfleet_release_sha256
  asterisk_install_dir     = var.asterisk_install_dir
  asterisk_tarball_url     = var.asterisk_tarball_url
  asterisk_tarball_sha256  = var.asterisk_tarball_sha256

  store_url         = local.store_url
  node_token        = var.node_token
  control_plane_url = local.control_plane_url
  lock_service_url  = local.lock_service_url
  core_private_ips  = module.core.private_ips
  carrier_networks  = var.carrier_networks
  pool              = var.node_pool
  max_calls         = var.extra_max_calls
  node_metrics_port = local.internal_ports["node-agent metrics"]
  rtp_port_min      = var.rtp_port_min
  rtp_port_max      = var.rtp_port_max
}
