//! The load balancer in front of many executors: one endpoint for the executor API, each call sent
//! where its function is already warm (weighted rendezvous hashing with a bounded-load fallback),
//! active and passive health checks, DNS discovery of executors, and its own `/metrics`.
//!
//! Status: not built yet (issue "Balancer: warm-affinity routing across executors").
