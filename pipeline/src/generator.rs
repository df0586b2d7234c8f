//! The built-in event generator: realistic events of both seed taxonomies, as NDJSON.
//!
//! Events follow the canonical envelope of the platform spec, with every optional envelope
//! field filled in the way a web or server SDK would, and the event-specific properties of
//! each spec under `properties`. Names are weighted like a real product (views and
//! integration calls are common, deals are rare); latencies are log-normal; a fraction of
//! events carry experiment assignments. A generated event is about 880 bytes of JSON.
//!
//! Event time advances at `events_per_second` from `start_ms`, with a uniform jitter of up to
//! `jitter_ms` (out-of-order arrival within the allowed lateness). A `late_fraction` of events
//! is held back by 30–120 s, beyond any sensible allowed lateness, and a `bad_fraction` is
//! deliberately broken (truncated, wrong types, missing fields, unknown names, invalid
//! UTF-8, empty lines), so that every path of the pipeline is exercised. Output is fully
//! determined by the seed.
//!
//! Events are linked the way the seeds' workflows link them, so that funnels, triage and
//! alerts have something to find. An event may schedule a *follow-up* of the same user (and
//! the same recommendation, action and ids), emitted when the clock reaches it:
//! `project_viewed` → `project_created` → `task_assigned`; `recommendation_generated` →
//! `recommendation_accepted` (or `_dismissed`) → `action_executed` (schema 1.1.0, with the
//! `recommendation_id`) → `outcome_reply_received` → `outcome_meeting_booked` →
//! `outcome_deal_advanced`; `project_creation_error` → a low-score, blocked feedback. Time is
//! compressed: the seconds and minutes between steps stand for the hours and days of real
//! traffic. Every three minutes of event time the `gmail` integration fails half its calls for
//! twenty seconds and its circuit breaker opens, then recovers.

use std::io::Write;

use sightline_schemas::format_rfc3339_ms;

/// What the generator was asked to emit for one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// A valid event, on time.
    Good,
    /// A valid event, held back beyond the allowed lateness.
    Late,
    /// A deliberately broken record.
    Bad,
}

/// Settings of the generator.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// Seed of the pseudo-random sequence.
    pub seed: u64,
    /// Event time of the first event, ms since the epoch.
    pub start_ms: i64,
    /// Events per second of event time.
    pub events_per_second: f64,
    /// Maximum out-of-order jitter, ms.
    pub jitter_ms: u64,
    /// Fraction of events held back by 30–120 s.
    pub late_fraction: f64,
    /// Fraction of deliberately broken records.
    pub bad_fraction: f64,
    /// Fraction of "dirty" records: personal data where it must not be (e-mail addresses,
    /// phone numbers, tokens in free text, an IP address field, coordinates, geo without
    /// consent, a raw e-mail as `user_id`). Some are accepted after scrubbing, some rejected;
    /// none may leave raw personal data in any output.
    pub dirty_fraction: f64,
    /// Number of distinct tenants.
    pub tenants: u32,
    /// Number of distinct users.
    pub users: u32,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            start_ms: 1_769_178_600_000, // 2026-01-23T14:30:00Z, the seed documents' example day
            events_per_second: 1000.0,
            jitter_ms: 2000,
            late_fraction: 0.001,
            bad_fraction: 0.001,
            dirty_fraction: 0.0,
            tenants: 50,
            users: 5000,
        }
    }
}

/// SplitMix64: small, fast, and good enough for synthetic data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One of the items.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Log-normal with the given median and shape.
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        let (u1, u2) = (self.unit().max(1e-12), self.unit());
        let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        median * (sigma * normal).exp()
    }
}

/// Event names with their relative frequency.
/// Follow-ups add more of the later steps (see the module documentation); circuit breakers
/// open only in the failure bursts.
const WEIGHTS: &[(&str, u32)] = &[
    ("project_viewed", 120),
    ("project_created", 8),
    ("task_assigned", 35),
    ("project_creation_error", 6),
    ("project_feedback_submitted", 6),
    ("recommendation_generated", 60),
    ("recommendation_viewed", 40),
    ("recommendation_accepted", 5),
    ("recommendation_dismissed", 3),
    ("action_executed", 8),
    ("action_failed", 3),
    ("action_rolled_back", 1),
    ("outcome_reply_received", 2),
    ("outcome_meeting_booked", 1),
    ("outcome_deal_advanced", 1),
    ("outcome_deliverable_shipped", 2),
    ("signal_received", 50),
    ("signal_processed", 48),
    ("integration_call_success", 150),
    ("integration_call_failed", 2),
];

/// The arm of `exp_aps_ranking_v2` whose actions turn three times slower part-way through.
pub const DEGRADED_ARM: &str = "variant_b";
/// When, after the generator's start (event time).
pub const DEGRADE_AFTER_MS: i64 = 60_000;
/// When `exp_guided_setup` starts, after the generator's start (event time).
pub const GUIDED_START_MS: i64 = 20_000;
/// A rollout by tenant that is not randomised, in two cohorts: when each starts, after the
/// generator's start (event time), and its tenants (generator indexes; see [`tenant_id`]).
/// From its start, one `action_executed` in three of a cohort's tenants fails instead
/// (`action_failed`, an error).
pub const ROLLOUT: [(i64, &[u64]); 2] = [(60_000, &[1, 2, 3]), (120_000, &[6, 7])];

/// The `tenant_id` the generator sends for tenant `tenant`.
pub fn tenant_id(tenant: u64) -> String {
    format!("t_{:016x}", mix(tenant))
}

/// Whether tenant `tenant` has the rollout `since_start_ms` after the generator's start.
fn rolled_out(tenant: u64, since_start_ms: i64) -> bool {
    ROLLOUT
        .iter()
        .any(|(start, tenants)| since_start_ms >= *start && tenants.contains(&tenant))
}

/// A user's arms in the two generated experiments, fixed per (tenant, user) as a bucketing
/// service would assign them: two users in three are in `exp_guided_setup` (control or
/// treatment); one in four of those is also in `exp_aps_ranking_v2` (control, variant_a or
/// variant_b).
pub fn arms_of(tenant: u64, user: u64) -> (Option<&'static str>, Option<&'static str>) {
    let bucket = mix(tenant.wrapping_mul(0x9e37_79b9) ^ user ^ 0x5eed);
    if bucket.is_multiple_of(3) {
        return (None, None);
    }
    let guided = ["control", "treatment"][(mix(bucket ^ 1) % 2) as usize];
    let aps = mix(bucket ^ 2)
        .is_multiple_of(4)
        .then(|| ["control", "variant_a", "variant_b"][(mix(bucket ^ 3) % 3) as usize]);
    (Some(guided), aps)
}

/// Every `BURST_PERIOD_MS` of event time, from `BURST_START_MS` into the period and for
/// `BURST_MS`, half the calls to [`BURST_INTEGRATION`] fail and its breaker opens.
const BURST_PERIOD_MS: i64 = 180_000;
const BURST_START_MS: i64 = 10_000;
const BURST_MS: i64 = 20_000;
const BURST_INTEGRATION: &str = "gmail";

/// What links an event to the ones before it in its workflow.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Context {
    recommendation_id: Option<String>,
    action_id: Option<String>,
    action_type: Option<&'static str>,
    /// APS score in tenths.
    aps_tenths: Option<u64>,
    /// The integration of a call or breaker, when it is forced (a burst).
    integration: Option<&'static str>,
    /// Feedback after an error: a low score.
    after_error: bool,
    /// The user is in the degraded arm and its degradation has started: slow actions.
    slow: bool,
}

/// A scheduled event of the same user.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct FollowUp {
    at_ms: i64,
    seq: u64,
    name: &'static str,
    tenant: u64,
    user: u64,
    context: Context,
}

/// Generates NDJSON lines. See the module documentation.
#[derive(Clone, Debug)]
pub struct Generator {
    config: GeneratorConfig,
    rng: Rng,
    emitted: u64,
    total_weight: u32,
    pending: std::collections::BinaryHeap<std::cmp::Reverse<FollowUp>>,
    scheduled: u64,
    /// The burst whose breaker has opened.
    breaker_burst: Option<i64>,
}

impl Generator {
    /// A generator with the given settings.
    pub fn new(config: GeneratorConfig) -> Generator {
        let rng = Rng::new(config.seed);
        Generator {
            config,
            rng,
            emitted: 0,
            total_weight: WEIGHTS.iter().map(|w| w.1).sum(),
            pending: Default::default(),
            scheduled: 0,
            breaker_burst: None,
        }
    }

    /// Number of lines generated so far.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// The nominal event time of the next event (before jitter), ms since the epoch.
    pub fn clock_ms(&self) -> i64 {
        self.config.start_ms + (self.emitted as f64 * 1000.0 / self.config.events_per_second) as i64
    }

    /// Appends the next line (without a trailing newline) to `out` and says what it is.
    pub fn next_line(&mut self, out: &mut Vec<u8>) -> LineKind {
        let nominal = self.clock_ms();
        self.emitted += 1;
        let jitter = self.rng.below(self.config.jitter_ms + 1) as i64;
        if self
            .pending
            .peek()
            .is_some_and(|std::cmp::Reverse(f)| f.at_ms <= nominal)
            && let Some(std::cmp::Reverse(f)) = self.pending.pop()
        {
            // Never further behind the clock than an on-time event.
            let time = f.at_ms.max(nominal - jitter);
            self.event_as(f.name, time, Some((f.tenant, f.user)), f.context, out);
            return LineKind::Good;
        }
        let roll = self.rng.unit();
        if roll < self.config.bad_fraction {
            self.bad_line(nominal - jitter, out);
            return LineKind::Bad;
        }
        if roll < self.config.bad_fraction + self.config.dirty_fraction {
            return self.dirty_line(nominal - jitter, out);
        }
        let (time, kind) = if roll
            < self.config.bad_fraction + self.config.dirty_fraction + self.config.late_fraction
        {
            (
                nominal - 30_000 - self.rng.below(90_000) as i64,
                LineKind::Late,
            )
        } else {
            (nominal - jitter, LineKind::Good)
        };
        self.event(time.max(0), out);
        kind
    }

    /// Appends one valid event at `time_ms` to `out`.
    pub fn event(&mut self, time_ms: i64, out: &mut Vec<u8>) {
        let mut name = self.pick_name();
        let mut context = Context::default();
        let who = (
            self.rng.below(u64::from(self.config.tenants)),
            self.rng.below(u64::from(self.config.users)),
        );
        if let Some(burst) = self.burst_at(time_ms)
            && name == "integration_call_success"
        {
            if self.rng.below(2) == 0 {
                name = "integration_call_failed";
                context.integration = Some(BURST_INTEGRATION);
                if self.breaker_burst != Some(burst) {
                    self.breaker_burst = Some(burst);
                    let breaker = Context {
                        integration: Some(BURST_INTEGRATION),
                        ..Context::default()
                    };
                    // A system event of a standard-route tenant.
                    self.schedule(time_ms + 1_000, "circuit_breaker_opened", (1, 0), breaker);
                }
            } else {
                // No call to the failing integration succeeds during the burst.
                context.integration = Some(*self.rng.pick(&["hubspot", "calendar"]));
            }
        }
        self.event_as(name, time_ms, Some(who), context, out);
    }

    /// The burst `time_ms` falls in, if it falls in one.
    fn burst_at(&self, time_ms: i64) -> Option<i64> {
        let since = time_ms - self.config.start_ms;
        let phase = since.rem_euclid(BURST_PERIOD_MS);
        (BURST_START_MS..BURST_START_MS + BURST_MS)
            .contains(&phase)
            .then(|| since.div_euclid(BURST_PERIOD_MS))
    }

    fn schedule(&mut self, at_ms: i64, name: &'static str, who: (u64, u64), context: Context) {
        self.scheduled += 1;
        self.pending.push(std::cmp::Reverse(FollowUp {
            at_ms,
            seq: self.scheduled,
            name,
            tenant: who.0,
            user: who.1,
            context,
        }));
    }

    /// Schedules the next step of the workflow `name` belongs to, with its probability.
    fn follow(&mut self, name: &str, time_ms: i64, who: (u64, u64), context: &Context) {
        let r = &mut self.rng;
        let roll = r.unit();
        let after =
            |r: &mut Rng, median_s: f64| time_ms + (r.log_normal(median_s, 0.7) * 1000.0) as i64;
        let next: Option<(&'static str, i64)> = match name {
            "project_viewed" if roll < 0.35 => Some(("project_created", after(r, 45.0))),
            "project_created" if roll < 0.6 => Some(("task_assigned", after(r, 30.0))),
            "project_creation_error" if roll < 0.5 => {
                Some(("project_feedback_submitted", after(r, 20.0)))
            }
            "recommendation_generated" if roll < 0.55 => {
                Some(("recommendation_accepted", after(r, 20.0)))
            }
            "recommendation_generated" if roll < 0.8 => {
                Some(("recommendation_dismissed", after(r, 25.0)))
            }
            "recommendation_accepted" if roll < 0.85 => Some(("action_executed", after(r, 10.0))),
            "action_executed" if context.recommendation_id.is_some() && roll < 0.45 => {
                Some(("outcome_reply_received", after(r, 60.0)))
            }
            "outcome_reply_received" if context.recommendation_id.is_some() && roll < 0.55 => {
                Some(("outcome_meeting_booked", after(r, 90.0)))
            }
            "outcome_meeting_booked" if context.recommendation_id.is_some() && roll < 0.5 => {
                Some(("outcome_deal_advanced", after(r, 120.0)))
            }
            _ => None,
        };
        if let Some((next, at)) = next {
            let mut context = context.clone();
            context.after_error = name == "project_creation_error";
            context.integration = None;
            self.schedule(at, next, who, context);
        }
    }

    fn event_as(
        &mut self,
        name: &'static str,
        time_ms: i64,
        who: Option<(u64, u64)>,
        mut context: Context,
        out: &mut Vec<u8>,
    ) {
        let r = &mut self.rng;
        let (tenant, user) = match who {
            Some(who) => who,
            None => (
                r.below(u64::from(self.config.tenants)),
                r.below(u64::from(self.config.users)),
            ),
        };
        // The rollout's tenants fail one action in three once their cohort has started.
        let name = if name == "action_executed"
            && rolled_out(tenant, time_ms - self.config.start_ms)
            && mix(user ^ (time_ms as u64)).is_multiple_of(3)
        {
            "action_failed"
        } else {
            name
        };
        // The degraded arm's actions run three times slower once its degradation has started.
        context.slow = arms_of(tenant, user).1 == Some(DEGRADED_ARM)
            && time_ms - self.config.start_ms >= DEGRADE_AFTER_MS;
        // A user's events share a session for up to five minutes of event time (sessions start
        // at a different offset for each user), as real sessions do.
        let session = mix(user.wrapping_mul(SESSION_MS)
            ^ ((time_ms as u64).wrapping_add(mix(user) % SESSION_MS) / SESSION_MS))
            >> 24;
        let catalog_entry = sightline_schemas::EventName::from_name(name).map(|n| n.spec());
        let spec = catalog_entry
            .map(|s| s.event_type.as_str())
            .unwrap_or("action");
        let from_platform_spec =
            catalog_entry.is_some_and(|s| s.origin == sightline_schemas::catalog::PLATFORM);
        let (feature_area, workflow, surface) = if from_platform_spec {
            (
                "projects",
                "project_creation",
                *r.pick(&["project_create_page", "task_board", "project_settings"]),
            )
        } else if name.starts_with("integration")
            || name == "circuit_breaker_opened"
            || name.starts_with("signal")
        {
            (
                "integrations",
                "signal_ingestion",
                *r.pick(&[
                    "/crm/v3/objects/deals",
                    "/gmail/v1/users/messages",
                    "/calendar/v3/events",
                ]),
            )
        } else {
            (
                "command_queue",
                "todays_moves",
                *r.pick(&[
                    "command_queue_today",
                    "/api/command-queue/today",
                    "action_drawer",
                ]),
            )
        };
        // An action that executes a recommendation says which one (schema 1.1.0).
        let version = if name == "action_executed" && context.recommendation_id.is_some() {
            "1.1.0"
        } else {
            "1.0.0"
        };
        let (source, platform, device) = match name {
            "project_viewed" | "project_feedback_submitted" | "recommendation_viewed" => (
                "client",
                *r.pick(&["web", "web", "ios", "android"]),
                "desktop",
            ),
            "recommendation_accepted" | "recommendation_dismissed" | "task_assigned" => {
                ("client", "web", "desktop")
            }
            _ => (*r.pick(&["server", "worker"]), "api", "server"),
        };
        let _ = write!(
            out,
            r#"{{"event_id":"{}","event_name":"{name}","event_type":"{spec}","timestamp":"{}","schema_version":"{version}","source":"{source}","platform":"{platform}","app_version":"{}","tenant_id":"t_{:016x}","user_id":"u_{:016x}","user_role":"{}","session_id":"s_{session:010x}","auth_context":"{}","is_internal":{},"feature_area":"{feature_area}","workflow_name":"{workflow}","surface":"{surface}","#,
            uuid_v4(r),
            format_rfc3339_ms(time_ms),
            r.pick(&["4.2.0", "4.2.1", "4.3.0-beta.1"]),
            mix(tenant),
            mix(user ^ 0xA5A5),
            r.pick(&["admin", "member", "member", "viewer"]),
            r.pick(&["sso", "scim", "passwordless", "api_token"]),
            r.below(20) == 0,
        );
        // `exp_guided_setup` starts part-way through: its users' earlier events are their
        // pre-exposure history (CUPED's covariate).
        let (guided, aps) = arms_of(tenant, user);
        let guided = guided.filter(|_| time_ms - self.config.start_ms >= GUIDED_START_MS);
        match (guided, aps) {
            (Some(guided), Some(aps)) => {
                let _ = write!(
                    out,
                    r#""experiment_assignments":{{"exp_guided_setup":"{guided}","exp_aps_ranking_v2":"{aps}"}},"#,
                );
            }
            (Some(guided), None) => {
                let _ = write!(
                    out,
                    r#""experiment_assignments":{{"exp_guided_setup":"{guided}"}},"#,
                );
            }
            (None, Some(aps)) => {
                let _ = write!(
                    out,
                    r#""experiment_assignments":{{"exp_aps_ranking_v2":"{aps}"}},"#,
                );
            }
            (None, None) => {}
        }
        let _ = write!(
            out,
            r#""request_id":"req_{:012x}","trace_id":"{:016x}{:016x}","device_type":"{device}","#,
            r.next_u64() >> 16,
            r.next_u64(),
            r.next_u64()
        );
        if device != "server" {
            // Client context and coarse geo exist only for client events.
            let _ = write!(
                out,
                r#""browser_family":"{}","os_family":"{}","connection_type":"{}","country":"{}","region":"{}","#,
                r.pick(&["chrome", "safari", "firefox", "edge"]),
                r.pick(&["macos", "windows", "linux", "ios", "android"]),
                r.pick(&["wifi", "ethernet", "cellular"]),
                r.pick(&["US", "DE", "GB", "FR", "BR", "IN"]),
                r.pick(&["us-east", "eu-west", "eu-central", "ap-south"]),
            );
            out.extend_from_slice(br#""geo_consent":true,"#);
        }
        let _ = write!(
            out,
            r#""pii_classification":"{}","data_sensitivity":"{}","properties":"#,
            r.pick(&["none", "low", "low", "medium"]),
            // Sensitivity is the tenant's: one in five tenants' data is restricted, so that a
            // user's workflow stays on one route.
            if tenant % 5 == 0 {
                "restricted"
            } else {
                *r.pick(&["internal", "internal", "internal", "public"])
            },
        );
        self.properties(name, &mut context, out);
        out.push(b'}');
        self.follow(name, time_ms, (tenant, user), &context);
    }

    fn pick_name(&mut self) -> &'static str {
        let mut roll = self.rng.below(u64::from(self.total_weight)) as u32;
        for &(name, weight) in WEIGHTS {
            if roll < weight {
                return name;
            }
            roll -= weight;
        }
        WEIGHTS[0].0
    }

    /// Writes the properties of `name`, taking the ids in `c` and recording the ones it makes.
    fn properties(&mut self, name: &str, c: &mut Context, out: &mut Vec<u8>) {
        let r = &mut self.rng;
        let ms = |r: &mut Rng, median: f64| (r.log_normal(median, 0.6) * 10.0).round() / 10.0;
        let id = |r: &mut Rng| uuid_v4(r);
        let _ = match name {
            "project_viewed" => {
                write!(
                    out,
                    r#"{{"template_id":"tpl_{}","prepopulated":{},"time_to_first_paint_ms":{}}}"#,
                    r.below(40),
                    r.below(2) == 0,
                    ms(r, 420.0)
                )
            }
            "project_created" => write!(
                out,
                r#"{{"project_id":"p_{:012x}","creation_path":"{}","member_count":{},"initial_tasks_count":{},"duration_ms":{},"validation_errors":[],"guardrail_status":"{}"}}"#,
                r.next_u64() >> 16,
                r.pick(&["blank", "template", "import"]),
                1 + r.below(12),
                r.below(30),
                ms(r, 1800.0),
                r.pick(&["pass", "pass", "pass", "warning", "fail"])
            ),
            "task_assigned" => write!(
                out,
                r#"{{"task_id":"tk_{:012x}","assignment_type":"{}","assignee_role":"{}","due_in_days":{},"priority":"{}","assignment_latency_ms":{}}}"#,
                r.next_u64() >> 16,
                r.pick(&["direct", "bulk", "auto"]),
                r.pick(&["member", "admin"]),
                r.below(30),
                r.pick(&["low", "medium", "high"]),
                ms(r, 95.0)
            ),
            "project_creation_error" => write!(
                out,
                r#"{{"stage":"{}","error_code":"{}","http_status":{},"recoverable":{},"retry_count":{},"trace_id":"{:016x}"}}"#,
                r.pick(&["load", "validation", "save", "notification"]),
                r.pick(&["E_TIMEOUT", "E_CONFLICT", "E_QUOTA", "E_VALIDATION"]),
                r.pick(&[400, 409, 429, 500, 503]),
                r.below(2) == 0,
                r.below(4),
                r.next_u64()
            ),
            "project_feedback_submitted" if c.after_error => write!(
                out,
                r#"{{"score":{},"sentiment":"negative","tags":["{}"],"comment_present":false,"correlation_id":"{}","blocked":{},"blocker_type":{}}}"#,
                1 + r.below(2),
                r.pick(&["usability", "performance", "support"]),
                id(r),
                r.below(2) == 0,
                r.pick(&["\"bug\"", "\"integration_failure\"", "null"]),
            ),
            "project_feedback_submitted" => {
                let score = *r.pick(&[1, 2, 3, 3, 4, 4, 4, 5, 5, 5]);
                let sentiment = match score {
                    1 | 2 => "negative",
                    3 => "neutral",
                    _ => "positive",
                };
                write!(
                    out,
                    r#"{{"score":{score},"sentiment":"{sentiment}","tags":["{}"],"comment_present":{},"correlation_id":"{}","blocked":false,"blocker_type":null}}"#,
                    r.pick(&["usability", "performance", "policy", "docs", "support"]),
                    r.below(3) == 0,
                    id(r)
                )
            }
            "recommendation_generated" => {
                let rec = id(r);
                let aps = 200 + r.below(800);
                let action_type = *r.pick(&["send_email", "create_task", "book_meeting"]);
                c.recommendation_id = Some(rec.clone());
                c.aps_tenths = Some(aps);
                c.action_type = Some(action_type);
                write!(
                    out,
                    r#"{{"recommendation_id":"{}","aps_score":{:.1},"action_type":"{}","revenue_impact":{},"urgency_days":{},"effort_minutes":{},"icp_score":{:.2},"reasoning":"High pipeline value, demo tomorrow (urgent), strong ICP fit","signal_source":"{}","signal_type":"{}"}}"#,
                    rec,
                    aps as f64 / 10.0,
                    action_type,
                    1000 * r.below(100),
                    r.below(14),
                    5 + r.below(60),
                    r.unit(),
                    r.pick(&["hubspot", "gmail", "calendar", "webhook"]),
                    r.pick(&["form_submitted", "deal_stage_changed", "email_replied"])
                )
            }
            "recommendation_viewed" => write!(
                out,
                r#"{{"recommendations_shown":{},"top_score":{:.1},"bottom_score":{:.1}}}"#,
                5 + r.below(10),
                70.0 + r.unit() * 30.0,
                20.0 + r.unit() * 30.0
            ),
            "recommendation_accepted" => {
                let rec = c.recommendation_id.clone().unwrap_or_else(|| id(r));
                let aps = c.aps_tenths.unwrap_or_else(|| 400 + r.below(600));
                let action_type = c
                    .action_type
                    .unwrap_or_else(|| *r.pick(&["send_email", "create_task"]));
                // Higher scores are decided on faster.
                let decision = r.log_normal(25.0 - aps as f64 / 60.0, 0.8);
                write!(
                    out,
                    r#"{{"recommendation_id":"{rec}","queue_item_id":"{}","aps_score":{:.1},"action_type":"{action_type}","time_to_decision_seconds":{}}}"#,
                    id(r),
                    aps as f64 / 10.0,
                    (decision * 10.0).round() / 10.0
                )
            }
            "recommendation_dismissed" => {
                let rec = c.recommendation_id.clone().unwrap_or_else(|| id(r));
                let aps = c.aps_tenths.unwrap_or_else(|| 200 + r.below(600));
                let action_type = c
                    .action_type
                    .unwrap_or_else(|| *r.pick(&["send_email", "create_task"]));
                write!(
                    out,
                    r#"{{"recommendation_id":"{rec}","queue_item_id":"{}","aps_score":{:.1},"action_type":"{action_type}","dismiss_reason":"{}"}}"#,
                    id(r),
                    aps as f64 / 10.0,
                    r.pick(&["not_relevant", "already_done", "bad_timing"])
                )
            }
            "action_executed" => {
                let action = id(r);
                let action_type = c
                    .action_type
                    .unwrap_or_else(|| *r.pick(&["send_email", "create_task"]));
                let linked = c
                    .recommendation_id
                    .as_ref()
                    .map(|rec| format!(r#""recommendation_id":"{rec}","#))
                    .unwrap_or_default();
                c.action_id = Some(action.clone());
                write!(
                    out,
                    r#"{{"action_id":"{action}",{linked}"action_type":"{action_type}","execution_mode":"{}","success":true,"error":null,"duration_ms":{},"metadata":{{"subject":"Follow up: Demo tomorrow","gmail_message_id":"msg_{}"}}}}"#,
                    r.pick(&["automated", "manual", "dry_run"]),
                    ms(r, if c.slow { 1_350.0 } else { 450.0 }),
                    r.below(100_000)
                )
            }
            "action_failed" => write!(
                out,
                r#"{{"action_id":"{}","action_type":"send_email","error_type":"{}","error_message":"Gmail API: Daily sending limit exceeded","retryable":{}}}"#,
                id(r),
                r.pick(&["api_error", "validation_error", "rate_limit"]),
                r.below(2) == 0
            ),
            "action_rolled_back" => write!(
                out,
                r#"{{"action_id":"{}","action_type":"send_email","rollback_reason":"{}","rollback_success":true}}"#,
                id(r),
                r.pick(&["user_requested", "failed_validation", "duplicate_detected"])
            ),
            "outcome_reply_received" => {
                let draft = id(r);
                let action = c.action_id.clone().unwrap_or_else(|| id(r));
                let rec = c.recommendation_id.clone().unwrap_or_else(|| id(r));
                write!(
                    out,
                    r#"{{"draft_id":"{draft}","action_id":"{action}","recommendation_id":"{rec}","time_to_reply_hours":{:.1},"reply_sentiment":"{}"}}"#,
                    r.log_normal(4.5, 0.7),
                    r.pick(&["positive", "neutral", "negative"])
                )
            }
            "outcome_meeting_booked" => {
                let draft = id(r);
                let action = c.action_id.clone().unwrap_or_else(|| id(r));
                let rec = c.recommendation_id.clone().unwrap_or_else(|| id(r));
                write!(
                    out,
                    r#"{{"draft_id":"{draft}","action_id":"{action}","recommendation_id":"{rec}","meeting_time":"2026-01-24T14:00:00Z","time_to_book_hours":{}}}"#,
                    1 + r.below(72)
                )
            }
            "outcome_deal_advanced" => {
                let deal = r.below(10_000);
                let rec = c.recommendation_id.clone().unwrap_or_else(|| id(r));
                write!(
                    out,
                    r#"{{"deal_id":"hs_deal_{deal}","recommendation_id":"{rec}","old_stage":"SQL","new_stage":"Opportunity","pipeline_value":{}}}"#,
                    5000 * (1 + r.below(20))
                )
            }
            "outcome_deliverable_shipped" => write!(
                out,
                r#"{{"deliverable_id":"{}","client":"c_{:08x}","deliverable_type":"{}","on_time":{}}}"#,
                id(r),
                r.next_u64() >> 32,
                r.pick(&["onboarding_doc", "report", "integration"]),
                r.below(4) != 0
            ),
            "signal_received" => write!(
                out,
                r#"{{"signal_id":"{}","source":"{}","signal_type":"{}","processed":false}}"#,
                id(r),
                r.pick(&["hubspot", "gmail", "calendar", "webhook"]),
                r.pick(&["deal_stage_changed", "form_submitted", "email_replied"])
            ),
            "signal_processed" => write!(
                out,
                r#"{{"signal_id":"{}","source":"{}","signal_type":"{}","recommendation_generated":{},"processing_duration_ms":{}}}"#,
                id(r),
                r.pick(&["hubspot", "gmail", "calendar", "webhook"]),
                r.pick(&["deal_stage_changed", "form_submitted"]),
                r.below(2) == 0,
                ms(r, 850.0)
            ),
            "integration_call_success" => write!(
                out,
                r#"{{"integration":"{}","endpoint":"/crm/v3/objects/deals","method":"{}","status_code":200,"duration_ms":{}}}"#,
                c.integration
                    .unwrap_or_else(|| *r.pick(&["hubspot", "gmail", "calendar"])),
                r.pick(&["GET", "POST"]),
                ms(r, 350.0)
            ),
            "integration_call_failed" => write!(
                out,
                r#"{{"integration":"{}","endpoint":"/crm/v3/objects/deals","method":"GET","status_code":{},"error_message":"Rate limit exceeded","retryable":true}}"#,
                c.integration
                    .unwrap_or_else(|| *r.pick(&["hubspot", "gmail", "calendar"])),
                r.pick(&[429, 500, 502, 503])
            ),
            _ => write!(
                out,
                r#"{{"service":"{}","failure_count":{},"threshold":5}}"#,
                c.integration
                    .unwrap_or_else(|| *r.pick(&["hubspot", "gmail", "calendar"])),
                5 + r.below(3)
            ),
        };
    }

    fn dirty_line(&mut self, time_ms: i64, out: &mut Vec<u8>) -> LineKind {
        let start = out.len();
        match self.rng.below(9) {
            0 => {
                // An e-mail address in a path: accepted, scrubbed.
                self.event_as(
                    "integration_call_success",
                    time_ms,
                    None,
                    Context::default(),
                    out,
                );
                replace_once(
                    out,
                    start,
                    b"\"surface\":\"",
                    b"\"surface\":\"/users/jane.doe@example.com",
                );
                LineKind::Good
            }
            1 => {
                // A raw e-mail address as user_id: accepted, pseudonymized.
                self.event(time_ms, out);
                replace_string_field(out, start, b"user_id", Some(b"\"casey@acmecorp.com\""));
                LineKind::Good
            }
            2 => {
                // An IP address in an undeclared field: rejected, payload redacted.
                self.event(time_ms, out);
                replace_once(
                    out,
                    start,
                    b"\"app_version\":",
                    b"\"client_ip\":\"203.0.113.7\",\"app_version\":",
                );
                LineKind::Bad
            }
            3 => {
                // Exact coordinates: rejected.
                self.event_as(
                    "circuit_breaker_opened",
                    time_ms,
                    None,
                    Context::default(),
                    out,
                );
                replace_once(
                    out,
                    start,
                    b"\"threshold\":",
                    b"\"latitude\":52.520008,\"longitude\":13.404954,\"threshold\":",
                );
                LineKind::Bad
            }
            4 => {
                // Coarse geo without consent: accepted, country and region dropped.
                self.event_as("project_viewed", time_ms, None, Context::default(), out);
                replace_once(out, start, br#""geo_consent":true,"#, b"");
                LineKind::Good
            }
            5 => {
                // Contact data and a secret in free text: accepted, scrubbed.
                self.event_as("action_failed", time_ms, None, Context::default(), out);
                replace_once(
                    out,
                    start,
                    b"Gmail API: Daily sending limit exceeded",
                    b"SMTP 550 for jane.doe@example.com (+1 415 555 0134), key sk_live_4eC39HqLyjWDarjtT1zdp7dc from 198.51.100.23",
                );
                LineKind::Good
            }
            6 => {
                // An e-mail address as an enum value: rejected; the value appears nowhere.
                self.event_as(
                    "integration_call_failed",
                    time_ms,
                    None,
                    Context::default(),
                    out,
                );
                replace_once(
                    out,
                    start,
                    b"\"integration\":\"",
                    b"\"integration\":\"jane.doe@example.com\",\"zz_was\":\"",
                );
                LineKind::Bad
            }
            7 => {
                // An e-mail address as the event name: rejected as unknown, counted as `unknown`.
                self.event(time_ms, out);
                replace_string_field(out, start, b"event_name", Some(b"\"jane.doe@example.com\""));
                LineKind::Bad
            }
            _ => {
                // Truncated JSON with an e-mail address and a bearer token: rejected, scrubbed text kept.
                out.extend_from_slice(br#"{"event_name":"action_failed","note":"Authorization: Bearer abcdefghijklmnop123 for jane.doe@example.com","#);
                LineKind::Bad
            }
        }
    }

    fn bad_line(&mut self, time_ms: i64, out: &mut Vec<u8>) {
        let variant = self.rng.below(7);
        let start = out.len();
        match variant {
            0 => {
                // Truncated JSON.
                self.event(time_ms, out);
                let keep = start + (out.len() - start) / 2;
                out.truncate(keep);
            }
            1 => {
                // Wrong type: user_id as a number.
                self.event(time_ms, out);
                replace_string_field(out, start, b"user_id", Some(b"12345"));
            }
            2 => {
                // Missing required field.
                self.event(time_ms, out);
                replace_string_field(out, start, b"session_id", None);
            }
            3 => {
                // Unknown event name.
                self.event(time_ms, out);
                replace_once(
                    out,
                    start,
                    b"\"event_name\":\"",
                    b"\"event_name\":\"zz_unknown_",
                );
            }
            4 => {
                // Invalid UTF-8 inside a string.
                self.event(time_ms, out);
                replace_once(
                    out,
                    start,
                    b"\"app_version\":\"",
                    b"\"app_version\":\"\xff\xfe",
                );
            }
            5 => {
                // Not JSON at all.
                out.extend_from_slice(b"GET /favicon.ico HTTP/1.1");
            }
            _ => {
                // An empty line.
            }
        }
    }
}

fn replace_once(out: &mut Vec<u8>, start: usize, from: &[u8], to: &[u8]) {
    if let Some(pos) = out[start..].windows(from.len()).position(|w| w == from) {
        let at = start + pos;
        out.splice(at..at + from.len(), to.iter().copied());
    }
}

/// Replaces the string value of `field` (after `start`) with the raw JSON `value`, or removes
/// the field and its comma when `value` is `None`.
fn replace_string_field(out: &mut Vec<u8>, start: usize, field: &[u8], value: Option<&[u8]>) {
    let mut key = Vec::with_capacity(field.len() + 4);
    key.push(b'"');
    key.extend_from_slice(field);
    key.extend_from_slice(b"\":\"");
    let Some(pos) = out[start..]
        .windows(key.len())
        .position(|w| w == key.as_slice())
    else {
        return;
    };
    let key_at = start + pos;
    let value_at = key_at + key.len() - 1;
    let Some(len) = out[value_at + 1..].iter().position(|&b| b == b'"') else {
        return;
    };
    let value_end = value_at + 1 + len + 1;
    match value {
        Some(raw) => {
            out.splice(value_at..value_end, raw.iter().copied());
        }
        None => {
            let end = if out.get(value_end) == Some(&b',') {
                value_end + 1
            } else {
                value_end
            };
            out.drain(key_at..end);
        }
    }
}

/// Longest session, ms of event time.
const SESSION_MS: u64 = 300_000;

fn mix(x: u64) -> u64 {
    let mut r = Rng::new(x);
    r.next_u64()
}

fn uuid_v4(r: &mut Rng) -> String {
    let (a, b) = (r.next_u64(), r.next_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sightline_ingest::Decoder;

    #[test]
    fn good_lines_decode_and_bad_lines_do_not() {
        let mut decoder = Decoder::new(
            1 << 20,
            std::sync::Arc::new(
                sightline_privacy::KeyRing::from_hex("test", &"5a".repeat(32), 30).unwrap(),
            ),
        );
        let mut generator = Generator::new(GeneratorConfig {
            bad_fraction: 0.05,
            late_fraction: 0.02,
            dirty_fraction: 0.02,
            ..GeneratorConfig::default()
        });
        let (mut bytes, mut good, mut bad) = (0usize, 0, 0);
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..20_000 {
            let mut line = Vec::new();
            let kind = generator.next_line(&mut line);
            bytes += line.len();
            match (kind, decoder.decode(&line)) {
                (LineKind::Bad, Ok(e)) => panic!(
                    "bad line decoded: {e:?} from {}",
                    String::from_utf8_lossy(&line)
                ),
                (LineKind::Bad, Err(_)) => bad += 1,
                (_, Ok(e)) => {
                    good += 1;
                    names.insert(e.event_name);
                }
                (_, Err(e)) => panic!(
                    "good line rejected: {e} in {}",
                    String::from_utf8_lossy(&line)
                ),
            }
        }
        assert!(bad > 600 && good > 18_000, "bad {bad} good {good}");
        assert_eq!(
            names.len(),
            sightline_schemas::EventName::all().count(),
            "every registered event is generated"
        );
        let mean = bytes / 20_000;
        assert!((750..=1000).contains(&mean), "mean line is {mean} bytes");
    }

    #[test]
    fn same_seed_same_lines() {
        let lines = |seed| {
            let mut generator = Generator::new(GeneratorConfig {
                seed,
                ..GeneratorConfig::default()
            });
            let mut out = Vec::new();
            for _ in 0..100 {
                generator.next_line(&mut out);
                out.push(b'\n');
            }
            out
        };
        assert_eq!(lines(7), lines(7));
        assert_ne!(lines(7), lines(8));
    }
}
