//! sluice user space: the dataplane (aya), the policy language, and the CLI.

pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod lb;
pub mod netns;
pub mod policy;
