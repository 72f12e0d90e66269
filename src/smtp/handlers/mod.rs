//! One file per phase of the dialogue. Each handler takes the state by value and
//! returns the next state with whether the session goes on.

mod auth;
mod data;
mod ehlo;
mod mail;
mod rcpt;
mod reset;
mod starttls;
