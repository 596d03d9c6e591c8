mod balancer;
mod builds;
mod conformance;
mod executor;
