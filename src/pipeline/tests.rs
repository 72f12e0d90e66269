//! Unit tests of the stage order.
