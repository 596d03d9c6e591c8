//! The build service: a RabbitMQ build queue (durable, confirmed, acknowledged only once the result
//! is stored), workers that fetch a function from a git repository or an archive, pack it into
//! storage and run the runtime image's build step through the executor API, and the HTTP API
//! (`/v1/builds`) that submits, inspects, streams and cancels builds.
//!
//! Status: not built yet (issue "Builds: a RabbitMQ build queue").
