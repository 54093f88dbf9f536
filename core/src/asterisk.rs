//! What callfleet tells Asterisk about its devices, shared by the node configuration
//! (`callfleet asterisk-config`) and the control plane's realtime answers, so the contexts a
//! device's rows name are the contexts the dialplan defines.

use crate::realtime::Row;
use crate::store::SipDevice;

/// The contexts callfleet's dialplan provides.
pub mod context {
    /// Where the carrier's calls enter.
    pub const FROM_CARRIER: &str = "callfleet-from-carrier";
    /// Dials the device whose extension is dialled.
    pub const DIAL_DEVICE: &str = "callfleet-dial-device";
    /// Where devices' own calls enter.
    pub const FROM_DEVICE: &str = "callfleet-from-device";
    /// Queued calls, routed to one free agent across the cluster by the node-agent.
    pub const QUEUE: &str = "callfleet-queue";
    /// An operator's check that the node-agent's FastAGI server answers this Asterisk.
    pub const AGI_CHECK: &str = "callfleet-agi-check";
    /// Dial's `U()` on an agent's leg when it answers: the node-agent checks the lease
    /// once more before the bridge.
    pub const FENCE: &str = "callfleet-fence";
}

/// The realtime families (extconfig names and control-plane paths) of PJSIP's objects.
pub mod family {
    /// PJSIP endpoints: one per device.
    pub const ENDPOINTS: &str = "ps_endpoints";
    /// PJSIP AORs: where a device is reached (a fixed contact, or its registrations).
    pub const AORS: &str = "ps_aors";
    /// PJSIP auths: the digest credentials a device registers with.
    pub const AUTHS: &str = "ps_auths";
    /// PJSIP contacts: registrations, written by whichever node the phone registered on.
    pub const CONTACTS: &str = "ps_contacts";
    /// All of them, in the order sorcery.conf lists them.
    pub const ALL: [&str; 4] = [ENDPOINTS, AORS, AUTHS, CONTACTS];
}

fn row(pairs: &[(&str, &str)]) -> Row {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

/// The device's PJSIP endpoint. Media always flows through the PBX (recording, transfer
/// and queue music need it) and the device's address is taken from what it sends, not
/// from what it claims, because desk phones sit behind NAT.
pub fn endpoint_row(device: &SipDevice) -> Row {
    let callerid = match &device.name {
        Some(name) => format!("\"{}\" <{}>", name.replace(['"', '\\'], ""), device.id),
        None => format!("<{}>", device.id),
    };
    let mut endpoint = row(&[
        ("id", &device.id),
        ("aors", &device.id),
        ("context", context::FROM_DEVICE),
        ("disallow", "all"),
        ("allow", "ulaw,alaw"),
        ("direct_media", "no"),
        ("rtp_symmetric", "yes"),
        ("force_rport", "yes"),
        ("rewrite_contact", "yes"),
        ("callerid", &callerid),
    ]);
    if device.credentials.is_some() {
        endpoint.insert(2, ("auth".to_owned(), device.id.clone()));
    }
    endpoint
}

/// Where the device is reached: its fixed contact, or the one registration it keeps (a
/// new registration replaces the old one, so a phone moved to another desk is not rung
/// at the old address).
pub fn aor_row(device: &SipDevice) -> Row {
    let mut aor = row(&[
        ("id", &device.id),
        ("max_contacts", "1"),
        ("remove_existing", "yes"),
    ]);
    if let Some(contact) = &device.contact {
        aor.push(("contact".to_owned(), contact.clone()));
    }
    aor
}

/// The device's credentials as Asterisk checks them (digest with the stored HA1); `None`
/// for a device that does not register.
pub fn auth_row(device: &SipDevice) -> Option<Row> {
    let credentials = device.credentials.as_ref()?;
    let digest = format!("MD5:{}", credentials.ha1());
    Some(row(&[
        ("id", &device.id),
        ("auth_type", "digest"),
        ("username", &device.id),
        ("realm", credentials.realm()),
        ("password_digest", &digest),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::value;
    use crate::store::DigestCredentials;

    fn device(credentials: bool) -> SipDevice {
        SipDevice {
            id: "2001".into(),
            name: Some("Desk \"12\"".into()),
            contact: (!credentials).then(|| "sip:2001@127.0.0.1:5071".to_owned()),
            credentials: credentials.then(|| {
                DigestCredentials::from_password("2001", "callfleet", "s3cret").expect("valid")
            }),
        }
    }

    #[test]
    fn a_registering_device_has_an_auth_and_a_desk_phone_a_fixed_contact() {
        let registering = device(true);
        let endpoint = endpoint_row(&registering);
        assert_eq!(value(&endpoint, "auth"), Some("2001"));
        assert_eq!(value(&endpoint, "context"), Some(context::FROM_DEVICE));
        assert_eq!(value(&endpoint, "callerid"), Some("\"Desk 12\" <2001>"));
        let auth = auth_row(&registering).expect("an auth");
        // echo -n '2001:callfleet:s3cret' | md5sum
        assert_eq!(
            value(&auth, "password_digest"),
            Some("MD5:1b6eda9c46f8ae98d6c7de02921d0716")
        );
        assert_eq!(value(&auth, "realm"), Some("callfleet"));
        assert_eq!(value(&aor_row(&registering), "contact"), None);

        let desk = device(false);
        assert_eq!(value(&endpoint_row(&desk), "auth"), None);
        assert_eq!(auth_row(&desk), None);
        assert_eq!(
            value(&aor_row(&desk), "contact"),
            Some("sip:2001@127.0.0.1:5071")
        );
    }
}
