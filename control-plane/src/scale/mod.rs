//! The autoscaler: extra nodes come and go with the load, without dropping a call.
//!
//! [`executor`] carries out its decisions, through the operator's programs ([`command`]) or
//! an EC2 Auto Scaling group ([`aws`]).

pub mod aws;
pub mod command;
pub mod executor;
