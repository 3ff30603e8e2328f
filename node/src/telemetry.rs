//! Structured logging, distributed tracing and the panic hook. Logs carry ids, sizes and hashes
//! only: never message bodies, phone numbers or tokens.
//!
//! Tracing: with `[tracing] otlp-endpoint` set, spans are exported over OTLP/gRPC by a batch
//! processor running on the node's tokio runtime. The W3C trace context crosses nodes in gRPC
//! metadata (`traceparent`) on peer calls, and rides in `MessageSent`/`MessageDelivered` to the
//! recipient's shard, so one send is one trace: the client RPC, the raft commit, the forward, the
//! destination's commit and the push on the recipient's stream.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

use crate::config::{LogFormat, LogRaw, TracingRaw};

/// How long finished spans wait before a batch is exported (a bounded queue holds them).
pub const EXPORT_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// The trace exporter, flushed and stopped by [`Telemetry::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace exporter did not shut down cleanly");
        }
    }
}

/// Installs the global subscriber (once per process; later calls are ignored). Must run inside
/// the node's tokio runtime when tracing is on (the exporter runs on it).
pub fn init(log: &LogRaw, tracing_config: &TracingRaw, node_id: u64) -> Telemetry {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_target(true)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(true).boxed(),
    };
    let mut telemetry = Telemetry::default();
    let otel = if tracing_config.otlp_endpoint.is_empty() {
        None
    } else {
        match exporter(tracing_config, node_id) {
            Ok(provider) => {
                let tracer = provider.tracer("courier-node");
                telemetry.provider = Some(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(error) => {
                eprintln!("tracing: OTLP exporter not started: {error}");
                None
            }
        }
    };
    let _ = Registry::default()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init();
    if telemetry.provider.is_some() {
        tracing::info!(endpoint = %tracing_config.otlp_endpoint, "exporting traces over OTLP");
    }
    telemetry
}

fn exporter(
    config: &TracingRaw,
    node_id: u64,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.otlp_endpoint.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_DELAY)
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node_id.to_string(),
        ))
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// One `traceparent` value, as stored in events.
struct TraceParent(Option<String>);

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

impl Extractor for TraceParent {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent")
            .then_some(self.0.as_deref())
            .flatten()
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Puts the current span's trace context into outgoing gRPC metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the trace context in incoming gRPC metadata, if any.
pub fn adopt(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(parent);
}

/// The current span's `traceparent`, or empty when tracing is off (nothing is stored then).
pub fn current_traceparent() -> String {
    let context = tracing::Span::current().context();
    let mut carrier = TraceParent(None);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.0.unwrap_or_default()
}

/// Makes `span` a child of a stored `traceparent`, if there is one.
pub fn adopt_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&TraceParent(Some(traceparent.to_owned())));
    let _ = span.set_parent(parent);
}

/// Logs a panic with thread and location, then aborts the process, in every build. Release builds
/// abort on panic anyway; a debug build (the jepsen suite runs those) would otherwise unwind only
/// the panicking task and leave a half-alive node, e.g. up and serving with one shard's raft dead.
/// A half-alive replica is worse than a dead one: a dead one is restarted or replaced.
pub fn set_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = %location,
            panic = %payload,
            backtrace = %std::backtrace::Backtrace::force_capture(),
            "panic: the node stops"
        );
        default(info);
        std::process::abort();
    }));
}
