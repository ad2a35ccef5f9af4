//! AMUSD worker loops (pending shm API).
