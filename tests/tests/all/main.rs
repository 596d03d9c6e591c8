mod balancer;
mod conformance;
mod executor;
