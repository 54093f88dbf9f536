terraform {
  # 1.7 brought mock providers to `terraform test`; the checks run on 1.11.
  required_version = ">= 1.7.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # The version the offline checks run against (the local provider mirror holds
      # 5.100.0); patch releases of it are accepted.
      version = "~> 5.100.0"
    }
  }
}
