//! vhost-user
