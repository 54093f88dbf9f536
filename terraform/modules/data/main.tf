# The fleet store (RDS MySQL, multi-AZ) and the lock service's Redis (ElastiCache, a
# primary and a replica in two zones with automatic failover), both in the private subnets
# and reachable from the nodes' security group only.

# --- MySQL: the fleet store (store.url on every node) ---

resource "aws_db_subnet_group" "this" {
  name       = "${var.name}-store"
  subnet_ids = var.subnet_ids
}

resource "aws_security_group" "mysql" {
  name        = "${var.name}-mysql"
  description = "callfleet fleet store: MySQL from the nodes"
  vpc_id      = var.vpc_id

  ingress {
    description     = "MySQL from the nodes"
    protocol        = "tcp"
    from_port       = 3306
    to_port         = 3306
    security_groups = var.client_security_group_ids
  }
}

resource "aws_db_instance" "store" {
  identifier     = "${var.name}-store"
  engine         = "mysql"
  engine_version = "8.0"
  instance_class = var.db_instance_class
  port           = 3306

  allocated_storage = var.db_allocated_storage
  storage_type      = "gp3"
  storage_encrypted = true

  db_name  = var.db_name
  username = var.db_username
  password = var.db_password

  # A standby in the other availability zone; RDS fails over to it by itself (the
  # endpoint's DNS name moves, callfleet reconnects).
  multi_az = true

  db_subnet_group_name   = aws_db_subnet_group.this.name
  vpc_security_group_ids = [aws_security_group.mysql.id]
  publicly_accessible    = false

  backup_retention_period   = 7
  deletion_protection       = var.db_deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.name}-store-final"
  apply_immediately         = false
}

# --- Redis: the lock service's leases (lock_service.redis_url on the core nodes) ---

resource "aws_elasticache_subnet_group" "this" {
  name       = "${var.name}-locks"
  subnet_ids = var.subnet_ids
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "callfleet lock service: Redis from the nodes"
  vpc_id      = var.vpc_id

  ingress {
    description     = "Redis from the nodes"
    protocol        = "tcp"
    from_port       = 6379
    to_port         = 6379
    security_groups = var.client_security_group_ids
  }
}

resource "aws_elasticache_parameter_group" "locks" {
  name   = "${var.name}-locks"
  family = "redis7"

  # A lease must never be evicted to make room: a full Redis refuses writes instead, and
  # the lock service refuses the claim rather than hand one agent to two calls.
  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "aws_elasticache_replication_group" "locks" {
  replication_group_id = "${var.name}-locks"
  description          = "callfleet lock service leases"
  engine               = "redis"
  engine_version       = "7.1"
  node_type            = var.redis_node_type
  port                 = 6379

  # A primary and a replica in two zones; ElastiCache promotes the replica when the
  # primary fails. The lock service sees the new primary's run id and quarantines claims
  # for lock_service.quarantine, so leases lost in the failover cannot be handed out twice.
  num_cache_clusters         = 2
  automatic_failover_enabled = true
  multi_az_enabled           = true

  parameter_group_name = aws_elasticache_parameter_group.locks.name
  subnet_group_name    = aws_elasticache_subnet_group.this.name
  security_group_ids   = [aws_security_group.redis.id]

  at_rest_encryption_enabled = true
  # callfleet's Redis client speaks plain redis:// (no TLS), so in-transit encryption
  # (and with it AUTH tokens) stays off; the security group admits the nodes only.
  transit_encryption_enabled = false

  snapshot_retention_limit = 1
  apply_immediately        = false
}
