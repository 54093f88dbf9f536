# --- What every deployment must set (no defaults) ---

variable "region" {
  description = "AWS region of the cluster, e.g. eu-central-1."
  type        = string
}

variable "carrier_networks" {
  description = "The carriers' signalling networks (IPv4 CIDRs, e.g. [\"192.0.2.0/28\"]): the only sources of SIP from outside the VPC. Ask the carrier for its SBCs' addresses."
  type        = list(string)

  validation {
    condition     = length(var.carrier_networks) > 0
    error_message = "List at least one carrier network: SIP is open to nothing else."
  }

  validation {
    condition     = alltrue([for n in var.carrier_networks : can(cidrhost(n, 0)) && can(regex("^[0-9./]+$", n))])
    error_message = "Every carrier network must be an IPv4 CIDR such as 192.0.2.0/28 (a single address: 192.0.2.10/32)."
  }

  validation {
    condition     = alltrue([for n in var.carrier_networks : !can(regex("/0$", n))])
    error_message = "A carrier network of /0 (such as 0.0.0.0/0) would open SIP to the whole internet; list the carriers' own networks."
  }
}

variable "ami_id" {
  description = "AMI of every node (core and extra): a Debian or Ubuntu x86_64 image with systemd and cloud-init, able to run the callfleet binary (glibc as on the build machine). It may already hold Asterisk at asterisk_install_dir."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]+$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "callfleet_release_url" {
  description = "HTTPS URL of the callfleet executable for linux x86_64 (target/release/callfleet of a release build), downloaded by each extra node at boot: e.g. a presigned S3 URL or your artifact store. callfleet publishes no official download; you provide this."
  type        = string

  validation {
    condition     = can(regex("^https://", var.callfleet_release_url))
    error_message = "callfleet_release_url must be an https:// URL."
  }
}

variable "callfleet_release_sha256" {
  description = "SHA-256 of that executable (sha256sum target/release/callfleet); a download that does not match stops the node's setup."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.callfleet_release_sha256))
    error_message = "callfleet_release_sha256 must be 64 lower-case hex digits."
  }
}

variable "node_token" {
  description = "A control-plane API token of role `node` (at least 16 characters, e.g. `openssl rand -hex 24`); the core nodes' control plane must list the same token in [[control_plane.tokens]]."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.node_token) >= 16
    error_message = "node_token must be at least 16 characters."
  }
}

variable "db_password" {
  description = "Master password of the MySQL fleet store (8 to 41 printable characters, without / @ \" or spaces, as RDS requires)."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.db_password) >= 8 && length(var.db_password) <= 41 && can(regex("^[!-~]+$", var.db_password)) && !can(regex("[/@\"]", var.db_password))
    error_message = "db_password must be 8 to 41 printable characters without /, @, \" or spaces."
  }
}

# --- Asterisk on the extra nodes ---

variable "asterisk_install_dir" {
  description = "Asterisk's install prefix on the extra nodes (the folder holding sbin/asterisk, lib/asterisk/modules and var/lib/asterisk, as ./scripts/build-asterisk makes it). Either bake it into ami_id, or set asterisk_tarball_url."
  type        = string
  default     = "/opt/asterisk"

  validation {
    condition     = can(regex("^/[A-Za-z0-9._/-]+$", var.asterisk_install_dir))
    error_message = "asterisk_install_dir must be an absolute path of letters, digits and . _ / -."
  }
}

variable "asterisk_tarball_url" {
  description = "HTTPS URL of a .tar.gz of an Asterisk install prefix (e.g. `tar -czf asterisk.tar.gz -C \"$(./scripts/build-asterisk)\" .`), unpacked into asterisk_install_dir at boot. Empty: Asterisk is already on the AMI there."
  type        = string
  default     = ""

  validation {
    condition     = var.asterisk_tarball_url == "" || can(regex("^https://", var.asterisk_tarball_url))
    error_message = "asterisk_tarball_url must be empty or an https:// URL."
  }
}

variable "asterisk_tarball_sha256" {
  description = "SHA-256 of the Asterisk tarball; required with asterisk_tarball_url."
  type        = string
  default     = ""

  validation {
    condition     = var.asterisk_tarball_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.asterisk_tarball_sha256))
    error_message = "asterisk_tarball_sha256 must be 64 lower-case hex digits."
  }
}

# --- The autoscaler ---

variable "max_extra" {
  description = "The most extra nodes the Auto Scaling group allows (its max_size); set the autoscaler's max_extra to at most this."
  type        = number
  default     = 10

  validation {
    condition     = var.max_extra >= 1 && floor(var.max_extra) == var.max_extra
    error_message = "max_extra must be a whole number of at least 1."
  }
}

variable "max_drain_seconds" {
  description = "callfleet's autoscaler `max_drain` in seconds: the longest a node drains before it is terminated anyway. Keep the two equal."
  type        = number
  default     = 900

  validation {
    # The hook's timeout (this plus drain_margin_seconds) may be at most 7200 s.
    condition     = var.max_drain_seconds >= 60 && var.max_drain_seconds <= 7140
    error_message = "max_drain_seconds must be between 60 and 7140 (AWS allows a lifecycle hook at most 7200 s)."
  }
}

variable "drain_margin_seconds" {
  description = "Added to max_drain_seconds for the termination lifecycle hook's heartbeat timeout, so AWS never cuts a drain short."
  type        = number
  default     = 300

  validation {
    condition     = var.drain_margin_seconds >= 60
    error_message = "drain_margin_seconds must be at least 60."
  }
}

# --- Sizes and names (defaults suit the seeds' 600 agents) ---

variable "name" {
  description = "Prefix of every resource name."
  type        = string
  default     = "callfleet"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2 to 21 lower-case letters, digits or -, starting with a letter."
  }
}

variable "vpc_cidr" {
  type    = string
  default = "10.40.0.0/16"

  validation {
    condition     = can(cidrsubnet(var.vpc_cidr, 8, 101))
    error_message = "vpc_cidr must be an IPv4 CIDR of /16 to /20 (it is cut into /24-sized subnets, 8 bits longer)."
  }
}

variable "media_networks" {
  description = "Where RTP may come from; null: the carriers' networks. Carriers whose media gateways differ from their SBCs list them here."
  type        = list(string)
  default     = null

  validation {
    condition     = var.media_networks == null || alltrue([for n in coalesce(var.media_networks, []) : can(cidrhost(n, 0))])
    error_message = "Every media network must be an IPv4 CIDR."
  }
}

variable "admin_networks" {
  description = "Networks allowed to SSH into the nodes; empty: no SSH rule."
  type        = list(string)
  default     = []
}

variable "key_name" {
  description = "EC2 key pair for SSH; null: none."
  type        = string
  default     = null
}

variable "core_instance_type" {
  type    = string
  default = "c6i.xlarge"
}

variable "extra_instance_type" {
  type    = string
  default = "c6i.large"
}

variable "core_user_data" {
  description = "User data for the core nodes; null: none (their callfleet and Asterisk are set up by the operator, see README.md)."
  type        = string
  default     = null
}

variable "node_pool" {
  description = "node.pool of the extra nodes."
  type        = string
  default     = "default"
}

variable "extra_max_calls" {
  description = "node.max_calls of an extra node: the calls one carries at full load."
  type        = number
  default     = 100
}

variable "rtp_port_min" {
  type    = number
  default = 10000
}

variable "rtp_port_max" {
  type    = number
  default = 20000
}

variable "control_plane_port" {
  description = "control_plane.listen's port on the core nodes (REST, XML-RPC, gRPC, /metrics)."
  type        = number
  default     = 8080
}

variable "lock_service_port" {
  description = "lock_service.listen's port on the core nodes (gRPC and the HTTP twin)."
  type        = number
  default     = 7070
}

variable "db_name" {
  type    = string
  default = "callfleet"
}

variable "db_username" {
  type    = string
  default = "callfleet"

  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9_]{0,15}$", var.db_username))
    error_message = "db_username must be 1 to 16 letters, digits or _, starting with a letter."
  }
}

variable "db_instance_class" {
  type    = string
  default = "db.m6g.large"
}

variable "db_allocated_storage" {
  type    = number
  default = 50
}

variable "db_deletion_protection" {
  type    = bool
  default = true
}

variable "redis_node_type" {
  type    = string
  default = "cache.m6g.large"
}
