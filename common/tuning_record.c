/* The tuning record (see tuning_record.h). */
#include "common/tuning_record.h"

#include "common/path.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { TUNING_RECORD_MAX_VALUE = 256, TUNING_RECORD_MAX_LINE = 2048 };

bool tuning_record_path(char *out, size_t out_size, const char *name) {
    char directory[1024];
    const char *tuning = getenv("TF_TUNING_DIR"), *cache = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    tf_status status;
    if (tuning && *tuning)
        status = path_format(directory, sizeof directory, "%s", tuning);
    else if (cache && *cache)
        status = path_format(directory, sizeof directory, "%s/tokenformer", cache);
    else if (home && *home)
        status = path_format(directory, sizeof directory, "%s/.cache/tokenformer", home);
    else
        return false;
    return status == TF_OK && path_make_directories(directory) == TF_OK &&
           path_format(out, out_size, "%s/%s", directory, name) == TF_OK;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* The value of one line "key\tHEX\n" when its key is `key` and HEX is exactly `size` bytes. */
static bool parse_line(const char *line, const char *key, unsigned char *value, size_t size) {
    size_t key_length = strlen(key);
    if (strncmp(line, key, key_length) != 0 || line[key_length] != '\t') return false;
    const char *hex = line + key_length + 1;
    for (size_t i = 0; i < size; i++) {
        int high = hex_digit(hex[2 * i]), low = high < 0 ? -1 : hex_digit(hex[2 * i + 1]);
        if (high < 0 || low < 0) return false;
        value[i] = (unsigned char)(high * 16 + low);
    }
    char end = hex[2 * size];
    return end == '\n' || end == '\0';
}

bool tuning_record_find(const char *path, const char *key, void *value, size_t size) {
    if (size > TUNING_RECORD_MAX_VALUE) return false;
    FILE *file = fopen(path, "r");
    if (!file) return false;
    char line[TUNING_RECORD_MAX_LINE];
    unsigned char candidate[TUNING_RECORD_MAX_VALUE];
    bool found = false;
    while (fgets(line, sizeof line, file)) {
        if (!parse_line(line, key, candidate, size)) continue;
        memcpy(value, candidate, size);
        found = true;
    }
    fclose(file);
    return found;
}

bool tuning_record_add(const char *path, const char *key, const void *value, size_t size) {
    char line[TUNING_RECORD_MAX_LINE];
    size_t key_length = strlen(key);
    if (strchr(key, '\t') || strchr(key, '\n') || key_length + 2 * size + 2 > sizeof line) {
        errno = EINVAL;
        return false;
    }
    memcpy(line, key, key_length);
    size_t length = key_length;
    line[length++] = '\t';
    const unsigned char *bytes = value;
    for (size_t i = 0; i < size; i++) {
        line[length++] = "0123456789abcdef"[bytes[i] >> 4];
        line[length++] = "0123456789abcdef"[bytes[i] & 15];
    }
    line[length++] = '\n';
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return false;
    bool written = write(fd, line, length) == (ssize_t)length;
    int saved = errno;
    close(fd);
    errno = saved;
    return written;
}
