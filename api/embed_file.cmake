# Generates a C file holding one file's bytes as a NUL-terminated array
# named ${NAME} (with ${NAME}_LEN), so the binary carries it. Invoked at
# build time with IN, OUT and NAME.
file(READ ${IN} hex HEX)
string(LENGTH "${hex}" n)
math(EXPR n "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE ${OUT}.tmp "/* generated from ${IN} by embed_file.cmake; do not edit */\n#include <stddef.h>\n"
     "const char ${NAME}[] = {${bytes} 0};\nconst size_t ${NAME}_LEN = ${n};\n")
execute_process(COMMAND ${CMAKE_COMMAND} -E copy_if_different ${OUT}.tmp ${OUT})
