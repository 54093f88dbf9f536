//! The Asterisk configuration folder of this node, written from callfleet's own
//! configuration so that the box and the cluster run the same PBX setup
//! (`callfleet asterisk-config --out DIR`, then `asterisk -C DIR/asterisk.conf`).
//!
//! Pure: [`render`] turns a configuration into file names and contents, the same bytes for
//! the same input; the caller writes them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use callfleet_core::config::{CallSourceKind, Config};

/// Why no Asterisk configuration can be written.
#[derive(Debug, thiserror::Error)]
pub enum AsteriskConfigError {
    /// The folder or a file cannot be written.
    #[error("cannot write the Asterisk configuration: {path}: {source}")]
    Io {
        /// What could not be written.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A setting the configuration needs is missing or unusable.
    #[error("cannot write the Asterisk configuration: `{key}` {reason}")]
    Setting {
        /// Dotted key of the setting.
        key: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
}

pub use callfleet_core::asterisk::context;
use callfleet_core::asterisk::family;

/// The sections of an Asterisk configuration that name objects outside callfleet's care
/// (devices until realtime provisioning serves them, site additions) go in this file of
/// the folder, which the generated `pjsip.conf` includes when it exists.
pub const LOCAL_PJSIP: &str = "pjsip.local.conf";

/// The modules a node uses, and only those (`autoload = no`): PJSIP with its sorcery
/// backends (files now, realtime over res_config_curl next), RTP, the dialplan and its
/// bridges, μ-law/A-law, and CURL/AGI for callfleet's own services. Nothing that binds a
/// port of its own is loaded, so several nodes (or test instances) share one host.
const LOADED: &[&str] = &[
    "app_dial.so",
    // ExecIf(): the queue dialplan takes the carrier's attributes only when none are set.
    "app_exec.so",
    // Gosub, which Dial's U() runs: without it Dial bridges an answered agent without
    // asking the fence (it only warns), so a lost lease could not stop a bridge.
    "app_stack.so",
    // CHANNEL() and PJSIP_HEADER(): the queue dialplan reads the caller's attributes from
    // the carrier's X-Callfleet-Attributes header.
    "func_channel.so",
    // FILTER(): what the carrier's header may put into the AGI URL.
    "func_strings.so",
    "res_pjsip_header_funcs.so",
    // Log() and Verbose(): the dialplan's own lines in messages.log.
    "app_verbose.so",
    "bridge_builtin_features.so",
    "bridge_holding.so",
    "bridge_native_rtp.so",
    "bridge_simple.so",
    "chan_bridge_media.so",
    "chan_pjsip.so",
    "codec_alaw.so",
    "codec_ulaw.so",
    "format_pcm.so",
    "format_wav.so",
    "func_curl.so",
    "pbx_config.so",
    "res_agi.so",
    // `channel originate` on the CLI, for checks such as `callfleet-agi-check`.
    "res_clioriginate.so",
    "res_speech.so",
    "res_config_curl.so",
    "res_curl.so",
    "res_musiconhold.so",
    "res_pjproject.so",
    "res_pjsip.so",
    "res_pjsip_acl.so",
    "res_pjsip_authenticator_digest.so",
    "res_pjsip_caller_id.so",
    "res_pjsip_dtmf_info.so",
    "res_pjsip_endpoint_identifier_ip.so",
    "res_pjsip_endpoint_identifier_user.so",
    "res_pjsip_nat.so",
    "res_pjsip_outbound_authenticator_digest.so",
    "res_pjsip_path.so",
    "res_pjsip_pubsub.so",
    "res_pjsip_registrar.so",
    "res_pjsip_rfc3326.so",
    "res_pjsip_sdp_rtp.so",
    "res_pjsip_session.so",
    "res_rtp_asterisk.so",
    "res_sorcery_astdb.so",
    "res_sorcery_config.so",
    "res_sorcery_memory.so",
    "res_sorcery_memory_cache.so",
    "res_sorcery_realtime.so",
    "res_timing_timerfd.so",
];

/// Writes the configuration folder `out` (the files, and the folders Asterisk writes to),
/// replacing callfleet's files and leaving others (such as [`LOCAL_PJSIP`]) alone. Returns
/// the folder as an absolute path (Asterisk resolves its folders from where it runs) and
/// the number of files written.
pub fn write(
    config: &Config,
    out: &Path,
) -> Result<(std::path::PathBuf, usize), AsteriskConfigError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AsteriskConfigError::Io { path, source }
    };
    // Rendered first: a configuration that cannot work leaves nothing behind.
    let absolute = std::path::absolute(out).map_err(io(out))?;
    let files = render(config, &absolute)?;
    std::fs::create_dir_all(&absolute).map_err(io(&absolute))?;
    for folder in ["run", "log", "lib", "spool", "agi-bin"] {
        let path = absolute.join(folder);
        std::fs::create_dir_all(&path).map_err(io(&path))?;
    }
    for (name, text) in &files {
        let path = absolute.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok((absolute, files.len()))
}

/// Every file of the configuration folder `out` for `config`, in a fixed order.
pub fn render(
    config: &Config,
    out: &Path,
) -> Result<Vec<(&'static str, String)>, AsteriskConfigError> {
    let install = config.asterisk.install.trim_end_matches('/');
    if install.is_empty() {
        return Err(AsteriskConfigError::Setting {
            key: "asterisk.install",
            reason: "is empty: set it to the Asterisk install (the folder holding sbin/asterisk, as ./scripts/build-asterisk prints it)".into(),
        });
    }
    let sip: SocketAddr =
        config
            .balancer
            .local_pbx
            .parse()
            .map_err(|_| AsteriskConfigError::Setting {
                key: "balancer.local_pbx",
                reason: format!(
                    "`{}` must be ip:port: the PBX's SIP transport listens there",
                    config.balancer.local_pbx
                ),
            })?;
    let out = out.display();
    let asterisk_conf = format!(
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n\
[directories]\n\
astetcdir => {out}\n\
astmoddir => {install}/lib/asterisk/modules\n\
astvarlibdir => {out}/lib\n\
astdbdir => {out}/lib\n\
astkeydir => {out}/lib\n\
astdatadir => {install}/var/lib/asterisk\n\
astagidir => {out}/agi-bin\n\
astspooldir => {out}/spool\n\
astrundir => {out}/run\n\
astlogdir => {out}/log\n\
astsbindir => {install}/sbin\n\
\n\
[options]\n\
cache_media_frames = yes\n"
    );
    let mut modules = String::from(
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n[modules]\nautoload = no\n",
    );
    for module in LOADED {
        modules.push_str(&format!("load => {module}\n"));
    }
    let logger = "[general]\n\n[logfiles]\nmessages.log => notice,warning,error\n".to_owned();
    // Files the core reads at every start; without them it logs an error each time.
    let header =
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n";
    let quiet = |body: &str| format!("{header}{body}");
    let mut files = vec![
        ("asterisk.conf", asterisk_conf),
        ("modules.conf", modules),
        ("logger.conf", logger),
        ("pjsip.conf", pjsip(config, sip)),
        ("extensions.conf", extensions(config)?),
        ("manager.conf", manager(config)?),
        // callfleet keeps its own call records; Asterisk's are off.
        ("cdr.conf", quiet("[general]\nenable = no\n")),
        ("cel.conf", quiet("[general]\nenable = no\n")),
        ("features.conf", quiet("[general]\n")),
        ("acl.conf", quiet("")),
        ("udptl.conf", quiet("[general]\n")),
        ("pjproject.conf", quiet("[startup]\n")),
        ("ccss.conf", quiet("[general]\n")),
        // Ringback for callers while a device rings (and while they wait in a queue).
        (
            "indications.conf",
            quiet(
                "[general]\ncountry = us\n\n[us]\ndescription = United States\n\
ringcadence = 2000,4000\ndial = 350+440\nbusy = 480+620/500,0/500\n\
ring = 440+480/2000,0/4000\ncongestion = 480+620/250,0/250\n",
            ),
        ),
    ];
    files.extend(realtime(config)?);
    Ok(files)
}

/// Devices from the node-agent's provisioning endpoint: PJSIP's endpoints, AORs and
/// auths are looked up in `pjsip.conf` first (the carrier, local additions) and then over
/// realtime; registrations live only in realtime, so every node sees every phone. No
/// sorcery memory cache sits in front: a refresh during an outage would empty it, while the
/// node-agent's cache answers through the outage and forwards changes at once. Without a
/// provisioning endpoint (`provisioning.listen` empty) devices come from `pjsip.local.conf`.
fn realtime(config: &Config) -> Result<Vec<(&'static str, String)>, AsteriskConfigError> {
    let listen = &config.provisioning.listen;
    if listen.is_empty() {
        return Ok(Vec::new());
    }
    let endpoint: SocketAddr = listen.parse().map_err(|_| AsteriskConfigError::Setting {
        key: "provisioning.listen",
        reason: format!("`{listen}` must be ip:port (the node-agent's provisioning endpoint)"),
    })?;
    // Asterisk asks the node-agent on this host; a wildcard listen address is reached on
    // loopback.
    let host = match endpoint.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        ip if ip.is_ipv6() => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let base = format!("http://{host}:{}/realtime", endpoint.port());
    let header =
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n";
    let mut sorcery = format!("{header}[res_pjsip]\n");
    for (object, family) in [
        ("endpoint", family::ENDPOINTS),
        ("aor", family::AORS),
        ("auth", family::AUTHS),
    ] {
        sorcery.push_str(&format!(
            "{object} = config,pjsip.conf,criteria=type={object}\n{object} = realtime,{family}\n"
        ));
    }
    sorcery.push_str(&format!("contact = realtime,{}\n", family::CONTACTS));
    let mut extconfig = format!("{header}[settings]\n");
    for family in family::ALL {
        extconfig.push_str(&format!("{family} => curl,{base}/{family}\n"));
    }
    // Seconds, as floats (func_curl multiplies by 1000). The node-agent answers within its
    // deadline whatever the control plane does, so these only bound a node-agent that is
    // gone; a dead one must not hold up Asterisk's threads.
    let deadline = config.provisioning.deadline.as_secs_f64();
    let res_curl = format!(
        "{header}[globals]\nconntimeout = 0.5\nhttptimeout = {:.3}\n",
        deadline + 0.5
    );
    Ok(vec![
        ("sorcery.conf", sorcery),
        ("extconfig.conf", extconfig),
        ("res_curl.conf", res_curl),
    ])
}

/// The transport on `balancer.local_pbx` and the carrier, identified by the addresses its
/// calls arrive from: the balancers that proxy them, and the carriers' own networks
/// (`balancer.allow`), which call the node directly after a 302.
fn pjsip(config: &Config, sip: SocketAddr) -> String {
    let mut sources: Vec<String> = config.asterisk.balancers.clone();
    if sources.is_empty() {
        let balancer = config.balancer.advertised();
        let host = balancer
            .parse::<SocketAddr>()
            .map(|address| address.ip().to_string())
            .unwrap_or_else(|_| {
                balancer
                    .rsplit_once(':')
                    .map_or(balancer, |(host, _)| host)
                    .to_owned()
            });
        // The balancer on this host reaches a PBX on this host from the PBX's own address
        // (the kernel's source for a local destination), whatever it advertises to
        // carriers; `callfleet up` advertises the host's routed address while the PBX
        // listens on loopback.
        // A PBX listening on the wildcard is sent to at the wildcard, which the kernel
        // takes for loopback, and loopback is then the source too.
        let reached_from = match sip.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        sources.push(reached_from.to_string());
        if host != "0.0.0.0" && host != "::" {
            sources.push(host);
        }
    }
    sources.extend(config.balancer.allow.iter().cloned());
    sources.sort();
    sources.dedup();
    let mut text = format!(
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n\
[transport-udp]\ntype = transport\nprotocol = udp\nbind = {sip}\n\n\
[transport-tcp]\ntype = transport\nprotocol = tcp\nbind = {sip}\n\n\
[carrier]\ntype = endpoint\ncontext = {from_carrier}\ndisallow = all\nallow = ulaw,alaw\n\
direct_media = no\n\n\
[carrier]\ntype = identify\nendpoint = carrier\n",
        from_carrier = context::FROM_CARRIER,
    );
    for source in sources {
        text.push_str(&format!("match = {source}\n"));
    }
    text.push_str(&format!("\n#tryinclude {LOCAL_PJSIP}\n"));
    text
}

fn extensions(config: &Config) -> Result<String, AsteriskConfigError> {
    let ring = config.asterisk.ring_timeout.as_secs().max(1);
    let agi = agi_address(config);
    let mut numbers = String::new();
    for (number, queue) in &config.asterisk.queues {
        check_number("asterisk.queues", number)?;
        // The queue context's pattern `_[0-9a-zA-Z].` needs two characters at least.
        if queue.len() < 2
            || !queue
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AsteriskConfigError::Setting {
                key: "asterisk.queues",
                reason: format!(
                    "`{number}` = `{queue}`: a queue id here is 2 or more letters, digits, `-` and `_` (e.g. \"sales\")"
                ),
            });
        }
        numbers.push_str(&format!(
            "exten => {number},1,Goto({},{queue},1)\n",
            context::QUEUE
        ));
    }
    let overflow = &config.asterisk.queue_overflow;
    let overflow = if overflow.is_empty() {
        "Congestion(5)".to_owned()
    } else {
        check_number("asterisk.queue_overflow", overflow)?;
        format!("Goto({},{overflow},1)", context::FROM_CARRIER)
    };
    let queue_body = match agi {
        Some(address) => format!(
            "; EXTEN is the queue's id. The node-agent holds the call until one free agent of the\n\
; cluster answers (CALLFLEET_RESULT=answered), or max_wait passes (overflow). Without\n\
; the node-agent (AGI fails after 2 s, or it stopped mid-wait) the call tries again\n\
; every second and keeps its place: ARRIVED travels along, and the waiting order\n\
; keeps an entry alive for 15 s.\n\
exten => _[0-9a-zA-Z].,1,Set(CALLFLEET_ARRIVED=${{EPOCH}})\n \
same => n,ExecIf($[\"${{CALLFLEET_ATTRIBUTES}}\" = \"\" & \"${{CHANNEL(channeltype)}}\" = \"PJSIP\"]?Set(CALLFLEET_ATTRIBUTES=${{FILTER(a-z0-9_ +,${{PJSIP_HEADER(read,X-Callfleet-Attributes)}})}}))\n \
same => n,Ringing()\n \
same => n(wait),Set(CALLFLEET_RESULT=)\n \
same => n,AGI(agi://{address}/queue?queue=${{EXTEN}}&arrived=${{CALLFLEET_ARRIVED}}&attributes=${{CALLFLEET_ATTRIBUTES}})\n \
same => n,GotoIf($[\"${{CALLFLEET_RESULT}}\" = \"answered\"]?done)\n \
same => n,GotoIf($[\"${{CALLFLEET_RESULT}}\" = \"overflow\"]?overflow)\n \
same => n,GotoIf($[${{EPOCH}} - ${{CALLFLEET_ARRIVED}} > {max_wait}]?overflow)\n \
same => n,Wait(1)\n \
same => n,Goto(wait)\n \
same => n(overflow),{overflow}\n \
same => n(done),Hangup()\n\n\
[{fence}]\n\
; Dial's U() on the agent's leg when it answers: the bridge happens only when the\n\
; node-agent still holds the agent's lease. No answer from it means no.\n\
exten => s,1,Set(CALLFLEET_RESULT=)\n \
same => n,AGI(agi://{address}/fence?ring=${{ARG1}})\n \
same => n,GotoIf($[\"${{CALLFLEET_RESULT}}\" = \"ok\"]?bridge)\n \
same => n,Set(GOSUB_RESULT=ABORT)\n \
same => n(bridge),Return()\n\
; Dial's b() on the agent's leg before it rings: the node-agent learns the leg's name,\n\
; to hang it up over AMI if the lease is lost while the phone rings.\n\
exten => ring,1,AGI(agi://{address}/ringing?ring=${{ARG1}})\n \
same => n,Return()\n",
            max_wait = config.node.queue.max_wait.as_secs(),
            fence = context::FENCE,
        ),
        None => "; node.agi.listen is empty: no node-agent takes queued calls here.\n\
exten => _[0-9a-zA-Z].,1,Log(WARNING,callfleet queue ${EXTEN}: FastAGI is off (node.agi.listen is empty))\n \
same => n,Congestion(5)\n"
            .to_owned(),
    };
    Ok(format!(
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n\
[{from_carrier}]\n\
; Numbers of asterisk.queues wait in their queue; any other that is a device's\n\
; extension rings that device.\n\
{numbers}\
exten => _X.,1,Goto({dial},${{EXTEN}},1)\n\n\
[{dial}]\n\
exten => _X.,1,Dial(PJSIP/${{EXTEN}},{ring})\n \
same => n,Hangup()\n\n\
[{from_device}]\n\
exten => _X.,1,Goto({dial},${{EXTEN}},1)\n\n\
[{queue_context}]\n\
{queue_body}\n\
[{agi_check}]\n\
; `channel originate Local/ping@{agi_check} application Wait 1` proves that the\n\
; node-agent's FastAGI server answers this Asterisk: messages.log then says pong.\n\
exten => ping,1,{ping}\n \
same => n,Log(NOTICE,callfleet FastAGI check: AGISTATUS=${{AGISTATUS}} CALLFLEET_RESULT=${{CALLFLEET_RESULT}})\n \
same => n,Hangup()\n",
        from_carrier = context::FROM_CARRIER,
        dial = context::DIAL_DEVICE,
        from_device = context::FROM_DEVICE,
        queue_context = context::QUEUE,
        agi_check = context::AGI_CHECK,
        ping = match agi {
            Some(address) => format!("AGI(agi://{address}/ping)"),
            None => "Log(NOTICE,callfleet FastAGI is off: node.agi.listen is empty)".to_owned(),
        },
    ))
}

/// A number as a carrier dials it, written into the dialplan as an extension.
fn check_number(key: &'static str, number: &str) -> Result<(), AsteriskConfigError> {
    if number.is_empty()
        || number.len() > 32
        || !number
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'*' || b == b'#' || b == b'+')
    {
        return Err(AsteriskConfigError::Setting {
            key,
            reason: format!(
                "`{number}` is not a dialled number: 1–32 of the digits, `*`, `#` and `+` (e.g. \"5000\")"
            ),
        });
    }
    Ok(())
}

/// Where Asterisk reaches the node-agent's FastAGI server: `node.agi.listen`, with a
/// wildcard address read as loopback (the agent runs beside its Asterisk).
fn agi_address(config: &Config) -> Option<SocketAddr> {
    let mut address = config.node.agi.address()?;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(address)
}

/// The node-agent's manager user, least privilege: it reads the call count with the
/// `Command` action (`write = command`), hangs up a queued call's ring whose lease was
/// lost (`Hangup`, `write = call`), and reads events of calls and the system, from
/// loopback only.
fn manager(config: &Config) -> Result<String, AsteriskConfigError> {
    let calls = &config.node.calls;
    let mut text = String::from(
        "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n[general]\n",
    );
    if calls.source != CallSourceKind::Ami {
        text.push_str("enabled = no\n");
        return Ok(text);
    }
    let address: SocketAddr = calls
        .address
        .parse()
        .map_err(|_| AsteriskConfigError::Setting {
            key: "node.calls.address",
            reason: format!(
                "`{}` must be ip:port: Asterisk's manager interface listens there",
                calls.address
            ),
        })?;
    if !address.ip().is_loopback() {
        return Err(AsteriskConfigError::Setting {
            key: "node.calls.address",
            reason: format!(
                "`{address}` is not a loopback address: the manager interface stays on this host"
            ),
        });
    }
    let secret = calls.secret.expose();
    if secret.is_empty() || secret.contains(['\n', '\r', ';']) {
        return Err(AsteriskConfigError::Setting {
            key: "node.calls.secret",
            reason: "must be set, on one line and without `;`".into(),
        });
    }
    let host = address.ip();
    let mask = if host.is_ipv4() {
        "255.255.255.255"
    } else {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    };
    text.push_str(&format!(
        "enabled = yes\nport = {port}\nbindaddr = {host}\n\n\
[{user}]\nsecret = {secret}\ndeny = 0.0.0.0/0.0.0.0\npermit = {host}/{mask}\n\
read = system,call\nwrite = command,call\n",
        port = address.port(),
        user = calls.username,
    ));
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use callfleet_core::config::Secret;

    fn config() -> Config {
        let mut config = Config::default();
        config.asterisk.install = "/opt/asterisk/".into();
        config.balancer.local_pbx = "127.0.0.1:5080".into();
        config.balancer.listen = "0.0.0.0:5060".into();
        config.balancer.allow = vec!["192.0.2.0/24".into(), "127.0.0.1".into()];
        config.node.calls.source = CallSourceKind::Ami;
        config.node.calls.address = "127.0.0.1:5038".into();
        config.node.calls.username = "callfleet".into();
        config.node.calls.secret = Secret::new("s3cret");
        config
    }

    fn file<'a>(files: &'a [(&str, String)], name: &str) -> &'a str {
        files
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| text.as_str())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn the_same_configuration_gives_the_same_bytes() {
        let out = Path::new("/run/pbx");
        let first = render(&config(), out).expect("renders");
        assert_eq!(first, render(&config(), out).expect("renders"));
        let names: Vec<&str> = first.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "asterisk.conf",
                "modules.conf",
                "logger.conf",
                "pjsip.conf",
                "extensions.conf",
                "manager.conf",
                "cdr.conf",
                "cel.conf",
                "features.conf",
                "acl.conf",
                "udptl.conf",
                "pjproject.conf",
                "ccss.conf",
                "indications.conf"
            ]
        );
        let modules = file(&first, "modules.conf");
        assert!(modules.contains("\nautoload = no\n"), "{modules}");
        assert_eq!(modules.matches("\nload => ").count(), LOADED.len());
        assert!(!modules.contains("chan_iax2"), "binds a port of its own");
        let asterisk = file(&first, "asterisk.conf");
        assert!(
            asterisk.contains("\n[directories]\n"),
            "not a template: {asterisk}"
        );
        assert!(asterisk.contains("astmoddir => /opt/asterisk/lib/asterisk/modules\n"));
        assert!(asterisk.contains("astrundir => /run/pbx/run\n"));
    }

    #[test]
    fn devices_come_from_the_node_agents_provisioning_endpoint_when_it_is_set() {
        let out = Path::new("/run/pbx");
        let without = render(&config(), out).expect("renders");
        assert!(!without.iter().any(|(name, _)| *name == "extconfig.conf"));
        let mut with = config();
        with.provisioning.listen = "0.0.0.0:8090".into();
        with.provisioning.token = callfleet_core::config::Secret::new("node-token-0123456789");
        let files = render(&with, out).expect("renders");
        assert_eq!(
            file(&files, "extconfig.conf"),
            "; Written by `callfleet asterisk-config`; edit callfleet's configuration instead.\n\
[settings]\n\
ps_endpoints => curl,http://127.0.0.1:8090/realtime/ps_endpoints\n\
ps_aors => curl,http://127.0.0.1:8090/realtime/ps_aors\n\
ps_auths => curl,http://127.0.0.1:8090/realtime/ps_auths\n\
ps_contacts => curl,http://127.0.0.1:8090/realtime/ps_contacts\n"
        );
        let sorcery = file(&files, "sorcery.conf");
        // pjsip.conf first (the carrier), then realtime; registrations only in realtime.
        assert!(
            sorcery.contains(
                "endpoint = config,pjsip.conf,criteria=type=endpoint\nendpoint = realtime,ps_endpoints\n"
            ),
            "{sorcery}"
        );
        assert!(
            sorcery.ends_with("contact = realtime,ps_contacts\n"),
            "{sorcery}"
        );
        assert!(!sorcery.contains("memory_cache"), "{sorcery}");
        assert!(
            file(&files, "res_curl.conf").ends_with("conntimeout = 0.5\nhttptimeout = 1.000\n")
        );
    }

    #[test]
    fn the_carrier_is_identified_by_the_balancers_and_the_allowed_networks_only() {
        let files = render(&config(), Path::new("/x")).expect("renders");
        let pjsip = file(&files, "pjsip.conf");
        assert!(pjsip.contains("bind = 127.0.0.1:5080\n"), "{pjsip}");
        let matches: Vec<&str> = pjsip
            .lines()
            .filter_map(|line| line.strip_prefix("match = "))
            .collect();
        // The wildcard listen names no host: the balancer on this box is the PBX's own.
        assert_eq!(matches, ["127.0.0.1", "192.0.2.0/24"]);

        // Advertised to carriers under the host's address (as `callfleet up` does), the
        // balancer still reaches the PBX on loopback from loopback.
        let mut advertised = config();
        advertised.balancer.advertise = "198.51.100.20:5060".into();
        let files = render(&advertised, Path::new("/x")).expect("renders");
        let matches: Vec<String> = file(&files, "pjsip.conf")
            .lines()
            .filter_map(|line| line.strip_prefix("match = ").map(str::to_owned))
            .collect();
        assert_eq!(matches, ["127.0.0.1", "192.0.2.0/24", "198.51.100.20"]);

        // A PBX on the wildcard is reached at it from loopback.
        for (wildcard, loopback) in [("0.0.0.0:5080", "127.0.0.1"), ("[::]:5080", "::1")] {
            let mut on_wildcard = advertised.clone();
            on_wildcard.balancer.local_pbx = wildcard.into();
            on_wildcard.balancer.allow = vec!["192.0.2.0/24".into()];
            let files = render(&on_wildcard, Path::new("/x")).expect("renders");
            let pjsip = file(&files, "pjsip.conf");
            assert!(pjsip.contains(&format!("bind = {wildcard}\n")), "{pjsip}");
            let matches: Vec<&str> = pjsip
                .lines()
                .filter_map(|line| line.strip_prefix("match = "))
                .collect();
            let mut expected = vec![loopback, "192.0.2.0/24", "198.51.100.20"];
            expected.sort_unstable();
            assert_eq!(matches, expected, "{wildcard}");
        }

        let mut explicit = config();
        explicit.asterisk.balancers = vec!["10.0.0.2".into(), "10.0.0.3".into()];
        explicit.balancer.allow.clear();
        let files = render(&explicit, Path::new("/x")).expect("renders");
        let matches: Vec<String> = file(&files, "pjsip.conf")
            .lines()
            .filter_map(|line| line.strip_prefix("match = ").map(str::to_owned))
            .collect();
        assert_eq!(matches, ["10.0.0.2", "10.0.0.3"]);
    }

    #[test]
    fn the_manager_user_may_read_calls_and_run_commands_from_loopback_only() {
        let files = render(&config(), Path::new("/x")).expect("renders");
        let manager = file(&files, "manager.conf");
        assert!(
            manager.contains("enabled = yes\nport = 5038\nbindaddr = 127.0.0.1\n"),
            "{manager}"
        );
        assert!(
            manager.contains("[callfleet]\nsecret = s3cret\n"),
            "{manager}"
        );
        assert!(manager.contains("deny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\n"));
        assert!(
            manager.ends_with("read = system,call\nwrite = command,call\n"),
            "{manager}"
        );

        let mut remote = config();
        remote.node.calls.address = "10.0.0.5:5038".into();
        let err = render(&remote, Path::new("/x")).expect_err("not loopback");
        assert!(err.to_string().contains("`node.calls.address`"), "{err}");

        let mut no_ami = config();
        no_ami.node.calls.source = CallSourceKind::Static;
        let files = render(&no_ami, Path::new("/x")).expect("renders");
        assert!(file(&files, "manager.conf").ends_with("[general]\nenabled = no\n"));
    }

    #[test]
    fn missing_settings_say_what_to_set() {
        let mut none = config();
        none.asterisk.install.clear();
        let err = render(&none, Path::new("/x")).expect_err("no install");
        assert!(
            err.to_string().contains("`asterisk.install` is empty"),
            "{err}"
        );
        let mut bad = config();
        bad.balancer.local_pbx = "pbx:5080".into();
        let err = render(&bad, Path::new("/x")).expect_err("not ip:port");
        assert!(err.to_string().contains("`balancer.local_pbx`"), "{err}");
    }

    #[test]
    fn the_fastagi_check_reaches_the_agent_s_listener_on_loopback() {
        let mut config = config();
        config.node.agi.listen = "0.0.0.0:4600".into();
        config.node.agi.allow_remote = true;
        let files = render(&config, Path::new("/x")).expect("renders");
        let dialplan = file(&files, "extensions.conf");
        assert!(
            dialplan.contains(
                "[callfleet-agi-check]\n; `channel originate Local/ping@callfleet-agi-check application Wait 1` proves that the\n; node-agent's FastAGI server answers this Asterisk: messages.log then says pong.\nexten => ping,1,AGI(agi://127.0.0.1:4600/ping)\n same => n,Log(NOTICE,callfleet FastAGI check: AGISTATUS=${AGISTATUS} CALLFLEET_RESULT=${CALLFLEET_RESULT})\n same => n,Hangup()\n"
            ),
            "{dialplan}"
        );
        config.node.agi.listen.clear();
        let files = render(&config, Path::new("/x")).expect("renders");
        assert!(file(&files, "extensions.conf").contains(
            "exten => ping,1,Log(NOTICE,callfleet FastAGI is off: node.agi.listen is empty)\n"
        ));
    }

    #[test]
    fn carrier_calls_ring_the_dialled_device_with_the_ring_timeout() {
        let mut config = config();
        config.asterisk.ring_timeout = std::time::Duration::from_secs(25);
        let files = render(&config, Path::new("/x")).expect("renders");
        let dialplan = file(&files, "extensions.conf");
        assert!(
            dialplan.contains(
                "[callfleet-from-carrier]\n; Numbers of asterisk.queues wait in their queue; any other that is a device's\n; extension rings that device.\nexten => _X.,1,Goto(callfleet-dial-device,${EXTEN},1)\n"
            ),
            "{dialplan}"
        );
        assert!(
            dialplan.contains("exten => _X.,1,Dial(PJSIP/${EXTEN},25)\n"),
            "{dialplan}"
        );
    }

    #[test]
    fn queue_numbers_wait_in_their_queue_and_answers_pass_the_fence() {
        let mut config = config();
        config.asterisk.queues = [
            ("5000".to_owned(), "sales".to_owned()),
            ("5001".to_owned(), "vip-care".to_owned()),
        ]
        .into();
        config.asterisk.queue_overflow = "1001".to_owned();
        config.node.queue.max_wait = std::time::Duration::from_secs(90);
        let files = render(&config, Path::new("/x")).expect("renders");
        let dialplan = file(&files, "extensions.conf");
        for expected in [
            "[callfleet-from-carrier]\n; Numbers of asterisk.queues wait in their queue; any other that is a device's\n; extension rings that device.\nexten => 5000,1,Goto(callfleet-queue,sales,1)\nexten => 5001,1,Goto(callfleet-queue,vip-care,1)\nexten => _X.,1,Goto(callfleet-dial-device,${EXTEN},1)\n",
            " same => n,AGI(agi://127.0.0.1:4573/queue?queue=${EXTEN}&arrived=${CALLFLEET_ARRIVED}&attributes=${CALLFLEET_ATTRIBUTES})\n",
            " same => n,GotoIf($[${EPOCH} - ${CALLFLEET_ARRIVED} > 90]?overflow)\n",
            " same => n(overflow),Goto(callfleet-from-carrier,1001,1)\n",
            "[callfleet-fence]\n",
            "exten => s,1,Set(CALLFLEET_RESULT=)\n same => n,AGI(agi://127.0.0.1:4573/fence?ring=${ARG1})\n same => n,GotoIf($[\"${CALLFLEET_RESULT}\" = \"ok\"]?bridge)\n same => n,Set(GOSUB_RESULT=ABORT)\n same => n(bridge),Return()\n; Dial's b() on the agent's leg before it rings: the node-agent learns the leg's name,\n; to hang it up over AMI if the lease is lost while the phone rings.\nexten => ring,1,AGI(agi://127.0.0.1:4573/ringing?ring=${ARG1})\n same => n,Return()\n",
        ] {
            assert!(
                dialplan.contains(expected),
                "{expected}\nnot in\n{dialplan}"
            );
        }
        for (number, queue, key) in [
            ("50 00", "sales", "asterisk.queues"),
            ("5000", "s", "asterisk.queues"),
            ("5000", "sa)les", "asterisk.queues"),
        ] {
            let mut bad = config.clone();
            bad.asterisk.queues = [(number.to_owned(), queue.to_owned())].into();
            let err = render(&bad, Path::new("/x")).expect_err(number).to_string();
            assert!(err.contains(key), "{err}");
        }
        let mut bad = config.clone();
        bad.asterisk.queue_overflow = "1001,1(x)".to_owned();
        let err = render(&bad, Path::new("/x"))
            .expect_err("overflow")
            .to_string();
        assert!(err.contains("asterisk.queue_overflow"), "{err}");
    }
}
