# The extra nodes' user data and the callfleet configuration inside it, rendered from
# templates only (no resources), so that scripts/check-terraform can render them offline
# and have the real callfleet binary read the configuration.

variable "callfleet_release_url" {
  type = string
}

variable "callfleet_release_sha256" {
  type = string
}

variable "asterisk_install_dir" {
  type = string
}

variable "asterisk_tarball_url" {
  type = string
}

variable "asterisk_tarball_sha256" {
  type = string
}

variable "store_url" {
  type      = string
  sensitive = true
}

variable "node_token" {
  type      = string
  sensitive = true
}

variable "control_plane_url" {
  type = string
}

variable "lock_service_url" {
  type = string
}

variable "core_private_ips" {
  type = list(string)
}

variable "carrier_networks" {
  type = list(string)
}

variable "pool" {
  type = string
}

variable "max_calls" {
  type = number
}

variable "node_metrics_port" {
  type = number
}

variable "rtp_port_min" {
  type = number
}

variable "rtp_port_max" {
  type = number
}

locals {
  # Values the script uses as shell words, quoted for the shell.
  shell_quote = { for k, v in {
    callfleet_release_url = var.callfleet_release_url
    asterisk_install_dir  = var.asterisk_install_dir
    asterisk_tarball_url  = var.asterisk_tarball_url
  } : k => "'${replace(v, "'", "'\\''")}'" }

  node_config = templatefile("${path.module}/callfleet.toml.tftpl", {
    store_url            = var.store_url
    pool                 = var.pool
    max_calls            = var.max_calls
    node_metrics_port    = var.node_metrics_port
    lock_service_url     = var.lock_service_url
    carrier_networks     = var.carrier_networks
    control_plane_url    = var.control_plane_url
    node_token           = var.node_token
    asterisk_install_dir = var.asterisk_install_dir
    core_private_ips     = var.core_private_ips
  })

  user_data = templatefile("${path.module}/user-data.sh.tftpl", {
    node_config              = local.node_config
    callfleet_release_url    = local.shell_quote.callfleet_release_url
    callfleet_release_sha256 = var.callfleet_release_sha256
    asterisk_install_dir     = local.shell_quote.asterisk_install_dir
    asterisk_from_tarball    = var.asterisk_tarball_url != ""
    asterisk_tarball_url     = local.shell_quote.asterisk_tarball_url
    asterisk_tarball_sha256  = var.asterisk_tarball_sha256
    rtp_port_min             = var.rtp_port_min
    rtp_port_max             = var.rtp_port_max
  })
}

output "node_config" {
  description = "callfleet's configuration before the @NODE_ID@, @PRIVATE_IP@, @PUBLIC_IP@ and @AMI_SECRET@ placeholders are filled in at boot."
  value       = local.node_config
  sensitive   = true
}

output "user_data" {
  description = "The user data: a bash script run once by cloud-init."
  value       = local.user_data
  sensitive   = true
}
