//! Bearer tokens: who is calling and what they may do.
//!
//! Every API face (REST, XML-RPC, gRPC) reads the same `Authorization: Bearer …` header and
//! asks [`Tokens::authorize`] for the role an operation needs. Tokens are compared in
//! constant time and never logged; what the audit log records is the token's *name*.
//!
//! Two operations are open to two roles that do not include each other: a queue's
//! candidates ([`CANDIDATE_READERS`]), which a node-agent reads to ring agents, and a caller
//! number's attributes ([`CALLER_LOOKUP`]), which it reads to route VIP callers.

use callfleet_core::config::{ApiToken, Role};

use crate::error::ControlError;

/// The tokens the API accepts.
#[derive(Clone, Default)]
pub struct Tokens {
    tokens: Vec<ApiToken>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

/// Who is calling, once the token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, for the audit log.
    pub name: String,
    /// What the token may do.
    pub role: Role,
}

impl Tokens {
    /// Accepts `tokens`.
    pub fn new(tokens: Vec<ApiToken>) -> Self {
        Self { tokens }
    }

    /// The caller behind an `Authorization` header value (or its absence), if it may do
    /// what `needed` allows.
    pub fn authorize(
        &self,
        authorization: Option<&[u8]>,
        needed: Role,
    ) -> Result<Caller, ControlError> {
        let Some(header) = authorization else {
            return Err(ControlError::Unauthenticated);
        };
        let presented = std::str::from_utf8(header)
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ControlError::Unauthenticated)?;
        let mut found = None;
        // Every token is compared, in constant time each, so timing tells nothing about
        // which or how much of a token matched.
        for token in &self.tokens {
            if constant_time_eq(token.token.expose().as_bytes(), presented.as_bytes()) {
                found = Some(token);
            }
        }
        let token = found.ok_or(ControlError::BadToken)?;
        if !token.role.allows(needed) {
            return Err(ControlError::Forbidden {
                name: token.name.clone(),
                role: token.role,
                needed,
            });
        }
        Ok(Caller {
            name: token.name.clone(),
            role: token.role,
        })
    }

    /// As [`Tokens::authorize`], for an operation that any one of `allowed` may do; a
    /// refusal names the first of them. An empty `allowed` refuses everyone.
    pub fn authorize_any(
        &self,
        authorization: Option<&[u8]>,
        allowed: &[Role],
    ) -> Result<Caller, ControlError> {
        let (first, others) = allowed.split_first().ok_or(ControlError::Unauthenticated)?;
        match self.authorize(authorization, *first) {
            Err(ControlError::Forbidden { name, role, .. })
                if others.iter().any(|other| role.allows(*other)) =>
            {
                Ok(Caller { name, role })
            }
            other => other,
        }
    }
}

/// Who may read a queue's candidates (`queue.candidates`): `read` and above, and `node`.
///
/// A node-agent routes its queued calls by the candidates, so its `node` token must read
/// them; it reads no other part of the directory. The rule is the same on REST, XML-RPC and
/// gRPC: the three faces serve the same operations, and a token that can read an answer on
/// one face gains nothing from being refused it on another (the node-agent itself asks over
/// REST). Keeping one rule per operation also keeps "what may a node token do" one short
/// list: realtime provisioning, candidates, a caller number's attributes
/// ([`CALLER_LOOKUP`]), and the one change it makes to the directory,
/// what happened when it rang an agent (REST `call-events`, which needs `node` itself, so
/// `admin` may too and `read`/`write` may not).
pub const CANDIDATE_READERS: [Role; 2] = [Role::Read, Role::Node];

/// Who may look up one caller number's attributes (`caller.attributes`): `read` and above,
/// and `node`.
///
/// A node-agent looks up each incoming caller's number to route VIP callers; like the
/// candidates, it is one answer it needs per call, the same on every face. The list of
/// every number (`caller.list`) needs `read`: a token taken from a node can ask about a
/// number it has, but cannot copy the center's VIP lists.
pub const CALLER_LOOKUP: [Role; 2] = [Role::Read, Role::Node];

/// The file in the data folder that keeps `callfleet up`'s admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token of a single box: read from `dir`/[`ADMIN_TOKEN_FILE`], or created there
/// (readable by the owner only) on first start. Returns whether it was created.
pub fn admin_token(dir: &std::path::Path) -> std::io::Result<(ApiToken, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(ADMIN_TOKEN_FILE);
    let token = |value: String| ApiToken {
        name: "admin".to_owned(),
        token: callfleet_core::config::Secret::new(value),
        role: Role::Admin,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 16 => return Ok((token(text.trim().to_owned()), false)),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} holds no token of 16 characters or more; delete it to have a new one made",
                path.display()
            )));
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let value = random_hex(24)?;
    std::fs::create_dir_all(dir)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(file, "{value}")?;
    Ok((token(value), true))
}

/// A fresh token with role `node` for `node`, for a node-agent in the same process as the
/// control plane (`callfleet up`); nothing keeps it.
pub fn node_token(node: &callfleet_core::NodeId) -> std::io::Result<ApiToken> {
    Ok(ApiToken {
        name: format!("node:{node}"),
        token: callfleet_core::config::Secret::new(random_hex(24)?),
        role: Role::Node,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `bytes` random bytes from the kernel, in lowercase hex: tokens, session ids.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut random = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use callfleet_core::config::Secret;

    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(vec![
            ApiToken {
                name: "crm".into(),
                token: Secret::new("write-token-0123456789"),
                role: Role::Write,
            },
            ApiToken {
                name: "wallboard".into(),
                token: Secret::new("read-token-0123456789"),
                role: Role::Read,
            },
        ])
    }

    #[test]
    fn a_token_grants_its_role_and_the_ones_below() {
        let tokens = tokens();
        let header = Some(&b"Bearer write-token-0123456789"[..]);
        let caller = tokens.authorize(header, Role::Read).expect("read");
        assert_eq!(caller.name, "crm");
        assert!(tokens.authorize(header, Role::Write).is_ok());
        assert!(matches!(
            tokens.authorize(header, Role::Admin),
            Err(ControlError::Forbidden {
                needed: Role::Admin,
                ..
            })
        ));
        // The scheme is case-insensitive (RFC 7235).
        assert!(
            tokens
                .authorize(Some(b"bearer write-token-0123456789"), Role::Write)
                .is_ok()
        );
    }

    #[test]
    fn a_node_token_reads_provisioning_and_nothing_else() {
        let node_and_admin = Tokens::new(vec![
            ApiToken {
                name: "node-a".into(),
                token: Secret::new("node-token-0123456789"),
                role: Role::Node,
            },
            ApiToken {
                name: "ops".into(),
                token: Secret::new("admin-token-0123456789"),
                role: Role::Admin,
            },
        ]);
        let node = Some(&b"Bearer node-token-0123456789"[..]);
        assert_eq!(
            node_and_admin
                .authorize(node, Role::Node)
                .expect("node")
                .name,
            "node-a"
        );
        for needed in [Role::Read, Role::Write, Role::Admin] {
            assert!(
                matches!(
                    node_and_admin.authorize(node, needed),
                    Err(ControlError::Forbidden {
                        role: Role::Node,
                        ..
                    })
                ),
                "{needed:?}"
            );
        }
        let admin = Some(&b"Bearer admin-token-0123456789"[..]);
        assert!(node_and_admin.authorize(admin, Role::Node).is_ok());
        assert!(matches!(
            tokens().authorize(Some(b"Bearer write-token-0123456789"), Role::Node),
            Err(ControlError::Forbidden {
                role: Role::Write,
                ..
            })
        ));
    }

    #[test]
    fn candidates_are_open_to_read_and_above_and_to_node() {
        let mut all = tokens();
        all.tokens.push(ApiToken {
            name: "node-a".into(),
            token: Secret::new("node-token-0123456789"),
            role: Role::Node,
        });
        for (header, name) in [
            (&b"Bearer node-token-0123456789"[..], "node-a"),
            (b"Bearer read-token-0123456789", "wallboard"),
            (b"Bearer write-token-0123456789", "crm"),
        ] {
            let caller = all
                .authorize_any(Some(header), &CANDIDATE_READERS)
                .expect("allowed");
            assert_eq!(caller.name, name);
        }
        assert!(matches!(
            all.authorize_any(None, &CANDIDATE_READERS),
            Err(ControlError::Unauthenticated)
        ));
        assert!(matches!(
            all.authorize_any(Some(b"Bearer node-token-0123456780"), &CANDIDATE_READERS),
            Err(ControlError::BadToken)
        ));
        // Two roles that both fall short: the refusal names the first needed.
        assert!(matches!(
            all.authorize_any(
                Some(b"Bearer node-token-0123456789"),
                &[Role::Write, Role::Read]
            ),
            Err(ControlError::Forbidden {
                role: Role::Node,
                needed: Role::Write,
                ..
            })
        ));
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_refused() {
        let tokens = tokens();
        assert!(matches!(
            tokens.authorize(None, Role::Read),
            Err(ControlError::Unauthenticated)
        ));
        assert!(matches!(
            tokens.authorize(Some(b"Basic dXNlcjpwYXNz"), Role::Read),
            Err(ControlError::Unauthenticated)
        ));
        assert!(matches!(
            tokens.authorize(Some(b"Bearer write-token-0123456788"), Role::Read),
            Err(ControlError::BadToken)
        ));
        assert!(matches!(
            tokens.authorize(Some(b"Bearer read-token-0123456789"), Role::Write),
            Err(ControlError::Forbidden {
                role: Role::Read,
                ..
            })
        ));
    }

    #[test]
    fn debug_output_names_tokens_without_showing_them() {
        let shown = format!("{:?}", tokens());
        assert!(shown.contains("crm"), "{shown}");
        assert!(!shown.contains("write-token"), "{shown}");
    }
}
