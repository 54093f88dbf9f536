# Variable validations that keep a deployment from opening SIP to the internet or cutting
# drains short. Each run is a plan that must fail on the named variable.

mock_provider "aws" {
  override_data {
    target = data.aws_availability_zones.available
    values = { names = ["eu-central-1a", "eu-central-1b"] }
  }
}

variables {
  region                   = "eu-central-1"
  carrier_networks         = ["192.0.2.0/28"]
  ami_id                   = "ami-0123456789abcdef0"
  callfleet_release_url    = "https://artifacts.example.invalid/callfleet"
  callfleet_release_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
  node_token               = "node-token-0123456789abcdef"
  db_password              = "not-a-real-password"
}

run "sip_open_to_the_internet_is_refused" {
  command = plan

  variables {
    carrier_networks = ["0.0.0.0/0"]
  }

  expect_failures = [var.carrier_networks]
}

run "the_internet_among_carriers_is_refused" {
  command = plan

  variables {
    carrier_networks = ["192.0.2.0/28", "0.0.0.0/0"]
  }

  expect_failures = [var.carrier_networks]
}

run "no_carrier_networks_is_refused" {
  command = plan

  variables {
    carrier_networks = []
  }

  expect_failures = [var.carrier_networks]
}

run "a_drain_longer_than_a_hook_can_wait_is_refused" {
  command = plan

  variables {
    max_drain_seconds = 7200
  }

  expect_failures = [var.max_drain_seconds]
}

run "a_plain_http_release_url_is_refused" {
  command = plan

  variables {
    callfleet_release_url = "http://artifacts.example.invalid/callfleet"
  }

  expect_failures = [var.callfleet_release_url]
}
