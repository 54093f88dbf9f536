//! gRPC `callfleet.control.v1.Control`: the same operations as REST, for typed clients.
//!
//! The token travels in the `authorization` metadata (`Bearer …`), as HTTP/2 carries the
//! REST header; errors become gRPC codes through [`ControlError::grpc`].
//!
//! `QueueStatus` is public, as over REST, and takes from the same per-address bucket
//! ([`crate::ratelimit`]); beyond it the answer is `RESOURCE_EXHAUSTED` with `retry-after`
//! metadata. The peer's address is the one the listener put in the HTTP request's
//! extensions, which tonic hands on.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use callfleet_core::config::Role;
use callfleet_core::store;
use callfleet_proto::control::v1 as pb;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::error::ControlError;
use crate::ratelimit::RateLimit;
use crate::service::{AgentView, AutoscalerView, Control, CredentialsInput};

/// The gRPC face of [`Control`].
#[derive(Debug, Clone)]
pub struct ControlService {
    control: Arc<Control>,
    status_limit: Arc<RateLimit>,
}

impl ControlService {
    /// Serves `control`; `status_limit` limits `QueueStatus`.
    pub fn new(control: Arc<Control>, status_limit: Arc<RateLimit>) -> Self {
        Self {
            control,
            status_limit,
        }
    }

    fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        Ok(self.control.authorize(header, role)?)
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn agent_pb(view: AgentView) -> pb::Agent {
    pb::Agent {
        id: view.agent.id,
        name: view.agent.name,
        tags: view.agent.tags.into_iter().collect(),
        daily_cap: view.agent.daily_cap,
        enabled: Some(view.agent.enabled),
        state: view.state.to_owned(),
        pause_reason: view.pause_reason.unwrap_or_default(),
        device: view.device.unwrap_or_default(),
        sales_today: view.sales_today,
        calls_today: view.calls_today,
        ringing_since_ms: view.ringing_since_ms,
        ringing_queue: view.ringing_queue.unwrap_or_default(),
        state_since_ms: view.state_since_ms,
    }
}

fn device_pb(device: store::Device) -> pb::Device {
    pb::Device {
        id: device.id,
        endpoint: device.endpoint,
        name: device.name.unwrap_or_default(),
        contact: device.contact.unwrap_or_default(),
        registers: device.registers,
        password: None,
        md5_cred: None,
        realm: None,
        remove_credentials: false,
    }
}

fn queue_pb(queue: store::Queue) -> pb::Queue {
    pb::Queue {
        id: queue.id,
        name: queue.name,
        service_level_ms: Some(queue.service_level_ms),
    }
}

fn caller_pb(entry: store::CallerEntry) -> pb::CallerAttributes {
    pb::CallerAttributes {
        number: entry.number,
        attributes: entry.attributes.into_iter().collect(),
    }
}

fn steering_pb(steering: store::ScalerSteering) -> pb::ScalerSteering {
    pb::ScalerSteering {
        paused: steering.paused,
        min_extra: steering.min_extra,
        max_extra: steering.max_extra,
    }
}

fn autoscaler_pb(view: AutoscalerView) -> pb::Autoscaler {
    let figures = view.figures;
    pb::Autoscaler {
        enabled: view.enabled,
        steering: Some(steering_pb(view.steering)),
        figures: Some(pb::AutoscalerFigures {
            calls: figures.calls,
            capacity: figures.capacity,
            utilisation: figures.utilisation,
            extra_active: figures.extra_active,
            extra_booting: figures.extra_booting,
            extra_draining: figures.extra_draining,
            min_extra: figures.min_extra,
            max_extra: figures.max_extra,
            paused: figures.paused,
        }),
        scale_out_above: view.scale_out_above,
        scale_in_below: view.scale_in_below,
        leader: view.leader.map(|leader| pb::AutoscalerLeader {
            holder: leader.holder,
            token: leader.token,
        }),
        recent: view
            .recent
            .into_iter()
            .map(|e| pb::ScaleDecision {
                id: e.id,
                at_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                subject: e.subject,
                detail: e.detail.to_string(),
            })
            .collect(),
    }
}

fn empty() -> Reply<pb::Empty> {
    Ok(Response::new(pb::Empty {}))
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Reply<pb::ListAgentsResponse> {
        self.caller(&request, Role::Read)?;
        let agents = self
            .control
            .list_agents()
            .into_iter()
            .map(agent_pb)
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn get_agent(&self, request: Request<pb::AgentRef>) -> Reply<pb::Agent> {
        self.caller(&request, Role::Read)?;
        let view = self.control.get_agent(&request.get_ref().agent).await?;
        Ok(Response::new(agent_pb(view)))
    }

    async fn put_agent(&self, request: Request<pb::Agent>) -> Reply<pb::Agent> {
        let caller = self.caller(&request, Role::Write)?;
        let agent = request.into_inner();
        let agent = store::Agent {
            id: agent.id,
            name: agent.name,
            tags: agent.tags.into_iter().collect(),
            daily_cap: agent.daily_cap,
            enabled: agent.enabled.unwrap_or(true),
        };
        Ok(Response::new(agent_pb(
            self.control.put_agent(&caller, &agent).await?,
        )))
    }

    async fn delete_agent(&self, request: Request<pb::AgentRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        self.control
            .delete_agent(&caller, &request.get_ref().agent)
            .await?;
        empty()
    }

    async fn set_tags(&self, request: Request<pb::SetTagsRequest>) -> Reply<pb::Agent> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        let view = self
            .control
            .set_tags(&caller, &body.agent, body.tags)
            .await?;
        Ok(Response::new(agent_pb(view)))
    }

    async fn set_daily_cap(&self, request: Request<pb::SetDailyCapRequest>) -> Reply<pb::Agent> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        let view = self
            .control
            .set_daily_cap(&caller, &body.agent, body.daily_cap)
            .await?;
        Ok(Response::new(agent_pb(view)))
    }

    async fn record_sale(
        &self,
        request: Request<pb::RecordSaleRequest>,
    ) -> Reply<pb::RecordSaleResponse> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.get_ref();
        let request_id = Some(body.request_id.as_str()).filter(|id| !id.is_empty());
        let sales_today = self
            .control
            .record_sale(&caller, &body.agent, request_id)
            .await?;
        Ok(Response::new(pb::RecordSaleResponse { sales_today }))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Reply<pb::Session> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        let (_, session) = self
            .control
            .login(&caller, &body.agent, &body.device)
            .await?;
        Ok(Response::new(pb::Session {
            agent: session.agent,
            device: session.device,
            endpoint: session.endpoint,
        }))
    }

    async fn logout(&self, request: Request<pb::AgentRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        self.control
            .logout(&caller, &request.get_ref().agent)
            .await?;
        empty()
    }

    async fn pause(&self, request: Request<pb::PauseRequest>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        self.control
            .pause(&caller, &body.agent, &body.reason)
            .await?;
        empty()
    }

    async fn unpause(&self, request: Request<pb::AgentRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        self.control
            .unpause(&caller, &request.get_ref().agent)
            .await?;
        empty()
    }

    async fn list_devices(&self, request: Request<pb::Empty>) -> Reply<pb::ListDevicesResponse> {
        self.caller(&request, Role::Read)?;
        let devices = self.control.list_devices().await?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: devices.into_iter().map(device_pb).collect(),
        }))
    }

    async fn put_device(&self, request: Request<pb::Device>) -> Reply<pb::Device> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        let device = store::Device {
            id: body.id,
            endpoint: body.endpoint,
            name: Some(body.name).filter(|n| !n.is_empty()),
            contact: Some(body.contact).filter(|c| !c.is_empty()),
            registers: false,
        };
        let credentials = CredentialsInput {
            password: body.password.map(Some),
            md5_cred: body.md5_cred.map(Some),
            realm: body.realm,
        };
        let credentials = if body.remove_credentials {
            if credentials.password.is_some() || credentials.md5_cred.is_some() {
                return Err(ControlError::invalid(
                    "remove_credentials",
                    "cannot remove credentials and set them in one call",
                )
                .into());
            }
            CredentialsInput {
                password: Some(None),
                ..credentials
            }
        } else {
            credentials
        };
        Ok(Response::new(device_pb(
            self.control
                .put_device(&caller, &device, credentials)
                .await?,
        )))
    }

    async fn delete_device(&self, request: Request<pb::DeviceRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        self.control
            .delete_device(&caller, &request.get_ref().device)
            .await?;
        empty()
    }

    async fn list_queues(&self, request: Request<pb::Empty>) -> Reply<pb::ListQueuesResponse> {
        self.caller(&request, Role::Read)?;
        let queues = self.control.list_queues().await?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: queues.into_iter().map(queue_pb).collect(),
        }))
    }

    async fn put_queue(&self, request: Request<pb::Queue>) -> Reply<pb::Queue> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        let queue = store::Queue {
            id: body.id,
            name: body.name,
            service_level_ms: body
                .service_level_ms
                .unwrap_or(store::directory::DEFAULT_SERVICE_LEVEL_MS),
        };
        let queue = self.control.put_queue(&caller, &queue).await?;
        Ok(Response::new(queue_pb(queue)))
    }

    async fn delete_queue(&self, request: Request<pb::QueueRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        self.control
            .delete_queue(&caller, &request.get_ref().queue)
            .await?;
        empty()
    }

    async fn list_members(&self, request: Request<pb::QueueRef>) -> Reply<pb::ListMembersResponse> {
        self.caller(&request, Role::Read)?;
        let queue = request.into_inner().queue;
        let members = self.control.list_members(&queue).await?;
        Ok(Response::new(pb::ListMembersResponse {
            members: members
                .into_iter()
                .map(|m| pb::Member {
                    queue: queue.clone(),
                    agent: m.agent,
                    priority: m.priority,
                })
                .collect(),
        }))
    }

    async fn set_priority(&self, request: Request<pb::SetPriorityRequest>) -> Reply<pb::Member> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        self.control
            .set_priority(&caller, &body.agent, &body.queue, body.priority)
            .await?;
        Ok(Response::new(pb::Member {
            queue: body.queue,
            agent: body.agent,
            priority: body.priority,
        }))
    }

    async fn remove_member(&self, request: Request<pb::MemberRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        self.control
            .remove_member(&caller, &body.agent, &body.queue)
            .await?;
        empty()
    }

    async fn queue_status(&self, request: Request<pb::QueueRef>) -> Reply<pb::QueueStatusResponse> {
        self.status_limit
            .admit(request.extensions().get::<ConnectInfo<SocketAddr>>())?;
        let view = self.control.queue_status(&request.get_ref().queue)?;
        let status = view.status;
        Ok(Response::new(pb::QueueStatusResponse {
            queue: status.queue,
            served: status.served,
            available_agents: u32::try_from(status.available_agents).unwrap_or(u32::MAX),
            logged_in_agents: u32::try_from(status.logged_in_agents).unwrap_or(u32::MAX),
            waiting: view.waiting,
            longest_wait_ms: view.longest_wait_ms,
            waiting_unknown: view.waiting_unknown,
            answered_today: view.answered_today,
            abandoned_today: view.abandoned_today,
            overflowed_today: view.overflowed_today,
            answered_within_sl_today: view.answered_within_sl_today,
            service_level_pct_today: view.service_level_pct_today,
        }))
    }

    async fn candidates(
        &self,
        request: Request<pb::CandidatesRequest>,
    ) -> Reply<pb::CandidatesResponse> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        self.control.authorize_candidates(header)?;
        let body = request.into_inner();
        let candidates = self.control.candidates(&body.queue, &body.attributes)?;
        Ok(Response::new(pb::CandidatesResponse {
            candidates: candidates
                .into_iter()
                .map(|c| pb::Candidate {
                    agent: c.agent,
                    endpoint: c.endpoint,
                    priority: c.priority,
                    demoted: c.demoted,
                })
                .collect(),
        }))
    }

    async fn set_caller_attributes(
        &self,
        request: Request<pb::SetCallerAttributesRequest>,
    ) -> Reply<pb::CallerAttributes> {
        let caller = self.caller(&request, Role::Write)?;
        let body = request.into_inner();
        let entry = self
            .control
            .set_caller_attributes(&caller, &body.number, body.attributes)
            .await?;
        Ok(Response::new(caller_pb(entry)))
    }

    async fn remove_caller(&self, request: Request<pb::CallerRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Write)?;
        self.control
            .remove_caller(&caller, &request.get_ref().number)
            .await?;
        empty()
    }

    async fn get_caller_attributes(
        &self,
        request: Request<pb::CallerRef>,
    ) -> Reply<pb::CallerAttributes> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        self.control.authorize_caller_lookup(header)?;
        let entry = self
            .control
            .caller_attributes(&request.get_ref().number)
            .await?;
        Ok(Response::new(caller_pb(entry)))
    }

    async fn list_callers(
        &self,
        request: Request<pb::ListCallersRequest>,
    ) -> Reply<pb::ListCallersResponse> {
        self.caller(&request, Role::Read)?;
        let body = request.into_inner();
        let limit = if body.limit == 0 { 100 } else { body.limit };
        let after = Some(body.after.as_str()).filter(|after| !after.is_empty());
        let callers = self.control.list_callers(after, limit).await?;
        Ok(Response::new(pb::ListCallersResponse {
            callers: callers.into_iter().map(caller_pb).collect(),
        }))
    }

    async fn list_nodes(&self, request: Request<pb::Empty>) -> Reply<pb::ListNodesResponse> {
        self.caller(&request, Role::Read)?;
        let nodes = self.control.list_nodes().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|n| pb::Node {
                    id: n.id.to_string(),
                    pool: n.pool.to_string(),
                    state: n.state.as_str().to_owned(),
                    drain_requested: n.drain_requested,
                    calls: n.calls,
                    max_calls: n.max_calls,
                    heartbeat_age_ms: n.age_ms,
                    stale: n.stale,
                })
                .collect(),
        }))
    }

    async fn drain(&self, request: Request<pb::NodeRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Admin)?;
        self.control
            .set_drain(&caller, &request.get_ref().node, true)
            .await?;
        empty()
    }

    async fn undrain(&self, request: Request<pb::NodeRef>) -> Reply<pb::Empty> {
        let caller = self.caller(&request, Role::Admin)?;
        self.control
            .set_drain(&caller, &request.get_ref().node, false)
            .await?;
        empty()
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Reply<pb::ListAuditResponse> {
        self.caller(&request, Role::Read)?;
        let body = request.into_inner();
        let limit = if body.limit == 0 { 100 } else { body.limit };
        let before = (body.before > 0).then_some(body.before);
        let entries = self.control.audit(limit, before).await?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::AuditEntry {
                    id: e.id,
                    at: jiff::Timestamp::from_millisecond(e.at_ms)
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    actor: e.actor,
                    action: e.action,
                    subject: e.subject,
                    detail: e.detail.to_string(),
                })
                .collect(),
        }))
    }

    async fn get_autoscaler(&self, request: Request<pb::Empty>) -> Reply<pb::Autoscaler> {
        self.caller(&request, Role::Read)?;
        let view = self.control.autoscaler_status().await?;
        Ok(Response::new(autoscaler_pb(view)))
    }

    async fn set_autoscaler(&self, request: Request<pb::ScalerSteering>) -> Reply<pb::Autoscaler> {
        let caller = self.caller(&request, Role::Admin)?;
        let body = request.into_inner();
        let steering = store::ScalerSteering {
            paused: body.paused,
            min_extra: body.min_extra,
            max_extra: body.max_extra,
        };
        let view = self.control.set_autoscaler(&caller, &steering).await?;
        Ok(Response::new(autoscaler_pb(view)))
    }
}
