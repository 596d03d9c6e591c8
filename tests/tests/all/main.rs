mod conformance;
mod executor;
