//! Protocol Buffers contracts shared by callfleet's gRPC services and clients.
//!
//! The code is generated at build time with a vendored `protoc`, so building needs no
//! system compiler.

/// Every callfleet service's descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("callfleet_descriptor");

/// The fleet view (`callfleet.fleet.v1`).
pub mod fleet {
    /// Version 1 of the fleet contract.
    #[allow(missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("callfleet.fleet.v1");
    }
}

/// Fenced leases (`callfleet.lock.v1`).
pub mod lock {
    /// Version 1 of the lock contract.
    #[allow(missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("callfleet.lock.v1");
    }
}

/// The control plane's API (`callfleet.control.v1`).
pub mod control {
    /// Version 1 of the control contract.
    #[allow(missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("callfleet.control.v1");
    }
}
