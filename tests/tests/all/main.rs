mod balancer;
mod builds;
mod cli;
mod conformance;
mod executor;
mod pools;
mod swarm;
