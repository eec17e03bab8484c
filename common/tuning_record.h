/* A record of choices that take time to make (the GEMM algorithm that a shape's first call timed
 * fastest), kept in a text file so that later processes on the same machine reuse them instead of
 * timing again: a B/16 evaluation would otherwise spend ~0.8 s of its first batch on it.
 *
 * One line per choice: the key (printable, no tab), a tab, the value's bytes in hex. A line is
 * appended whole by one write to a file opened with O_APPEND, so processes adding at once (the
 * ranks of a run) do not interleave; the last line of a key wins; lines that do not parse, or
 * whose value has another length, are skipped. A value read back is only a hint: its user checks
 * it (cuBLASLt: cublasLtMatmulAlgoCheck) before trusting it. */
#ifndef TF_COMMON_TUNING_RECORD_H
#define TF_COMMON_TUNING_RECORD_H

#include <stdbool.h>
#include <stddef.h>

/* out = DIR/name, DIR being $TF_TUNING_DIR, else $XDG_CACHE_HOME/tokenformer, else
 * $HOME/.cache/tokenformer, created if missing. False when no directory can be had (nothing is
 * recorded then; why is logged once by the caller). */
bool tuning_record_path(char *out, size_t out_size, const char *name);

/* The value of key's last line, exactly `size` bytes, into value; false when there is none. */
bool tuning_record_find(const char *path, const char *key, void *value, size_t size);

/* Appends key's line; false (errno set) when the file cannot be written. */
bool tuning_record_add(const char *path, const char *key, const void *value, size_t size);

#endif
