# The data module on its own: MySQL multi-AZ, Redis with automatic failover and no eviction.

mock_provider "aws" {}

variables {
  name                      = "callfleet"
  vpc_id                    = "vpc-0123456789abcdef0"
  subnet_ids                = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  client_security_group_ids = ["sg-0cccccccccccccccc"]
  db_name                   = "callfleet"
  db_username               = "callfleet"
  db_password               = "not-a-real-password"
  db_instance_class         = "db.m6g.large"
  db_allocated_storage      = 50
  db_deletion_protection    = true
  redis_node_type           = "cache.m6g.large"
}

run "databases" {
  command = plan

  module {
    source = "./modules/data"
  }

  assert {
    condition     = aws_db_instance.store.multi_az
    error_message = "The fleet store must be multi-AZ."
  }

  assert {
    condition     = aws_db_instance.store.engine == "mysql" && !aws_db_instance.store.publicly_accessible
    error_message = "The fleet store is a private MySQL."
  }

  assert {
    condition     = [for p in aws_elasticache_parameter_group.locks.parameter : p.value if p.name == "maxmemory-policy"] == ["noeviction"]
    error_message = "Redis must never evict a lease: maxmemory-policy noeviction."
  }

  assert {
    condition     = aws_elasticache_replication_group.locks.parameter_group_name == aws_elasticache_parameter_group.locks.name
    error_message = "The replication group must use the noeviction parameter group."
  }

  assert {
    condition     = aws_elasticache_replication_group.locks.automatic_failover_enabled && aws_elasticache_replication_group.locks.multi_az_enabled
    error_message = "Redis must fail over by itself, to another zone."
  }

  assert {
    condition     = aws_elasticache_replication_group.locks.num_cache_clusters == 2
    error_message = "Automatic failover needs a replica: two cache nodes."
  }
}
