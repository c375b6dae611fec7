//! Facade placeholder, replaced below.
