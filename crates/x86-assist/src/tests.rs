//! Unit tests: decoding and effect of every instruction, with a fake page-granular guest memory.
