"""Small leaf helpers shared by all three programs (logging setup). No mesh logic here."""
