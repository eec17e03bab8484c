/* The tuning record (common/tuning_record.h): values read back as written, the last line of a key
 * winning, keys that share a prefix kept apart, damaged lines and values of another length
 * skipped, and the directory chosen from TF_TUNING_DIR and created. */
#include "common/tuning_record.h"
#include "tests/test_util.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static char scratch[1024];

static void test_round_trip(void) {
    char path[1200];
    snprintf(path, sizeof path, "%s/record.txt", scratch);
    uint64_t first[8], second[8], read[8];
    for (int i = 0; i < 8; i++) {
        first[i] = 0x0123456789abcdefull * (uint64_t)(i + 1);
        second[i] = ~first[i];
    }
    CHECK(!tuning_record_find(path, "matmul m=1", read, sizeof read), "a missing file has no value");
    CHECK(tuning_record_add(path, "matmul m=1", first, sizeof first), "add to a new file");
    CHECK(tuning_record_add(path, "matmul m=10", second, sizeof second), "add a key that extends the first");
    memset(read, 0, sizeof read);
    CHECK(tuning_record_find(path, "matmul m=1", read, sizeof read) && memcmp(read, first, sizeof read) == 0,
          "the value read back is the one written, not the longer key's");
    CHECK(tuning_record_find(path, "matmul m=10", read, sizeof read) &&
              memcmp(read, second, sizeof read) == 0,
          "the longer key keeps its own value");
    CHECK(tuning_record_add(path, "matmul m=1", second, sizeof second), "a second line for a key");
    CHECK(tuning_record_find(path, "matmul m=1", read, sizeof read) && memcmp(read, second, sizeof read) == 0,
          "the last line of a key wins");
    CHECK(!tuning_record_find(path, "matmul m=1", read, 4), "a value of another length is not read");
    CHECK(!tuning_record_add(path, "bad\tkey", first, sizeof first), "a key with a tab is refused");

    /* A torn or edited line in the middle: skipped, the lines around it still read. */
    FILE *file = fopen(path, "a");
    if (!CHECK(file != NULL, "reopen %s", path)) return;
    fputs("matmul m=2\t0123zz\nmatmul m=2\t01\n", file);
    fclose(file);
    unsigned char two[2] = {0xfe, 0x01}, two_read[2];
    CHECK(!tuning_record_find(path, "matmul m=2", two_read, sizeof two_read),
          "damaged and short lines are skipped");
    CHECK(tuning_record_add(path, "matmul m=2", two, sizeof two), "add after damaged lines");
    CHECK(tuning_record_find(path, "matmul m=2", two_read, sizeof two_read) && memcmp(two, two_read, 2) == 0,
          "a line after damaged ones reads");
    CHECK(tuning_record_find(path, "matmul m=10", read, sizeof read) &&
              memcmp(read, second, sizeof read) == 0,
          "lines before damaged ones still read");
}

static void test_directory(void) {
    char directory[1200], path[1400];
    snprintf(directory, sizeof directory, "%s/cache/nested", scratch);
    setenv("TF_TUNING_DIR", directory, 1);
    CHECK(tuning_record_path(path, sizeof path, "cublaslt.txt"), "a path under TF_TUNING_DIR");
    char expected[1400];
    snprintf(expected, sizeof expected, "%s/cublaslt.txt", directory);
    CHECK(strcmp(path, expected) == 0, "path %s, expected %s", path, expected);
    struct stat info;
    CHECK(stat(directory, &info) == 0 && S_ISDIR(info.st_mode), "TF_TUNING_DIR %s created", directory);
    unsetenv("TF_TUNING_DIR");
    setenv("XDG_CACHE_HOME", scratch, 1);
    CHECK(tuning_record_path(path, sizeof path, "x.txt"), "a path under XDG_CACHE_HOME");
    snprintf(expected, sizeof expected, "%s/tokenformer/x.txt", scratch);
    CHECK(strcmp(path, expected) == 0, "path %s, expected %s", path, expected);
    unsetenv("XDG_CACHE_HOME");
}

int main(void) {
    if (!test_make_temp_dir(scratch, sizeof scratch, "test_tuning_record")) {
        perror("mkdtemp");
        return 1;
    }
    test_round_trip();
    test_directory();
    test_remove_tree(scratch);
    return test_finish("test_tuning_record");
}
