# The cuda backend (included from the top-level CMakeLists.txt when DEVPIPE_CUDA=ON).
#
# Builds src/backends/cuda/*.cpp and *.cu into the existing `devpipe` target. Needs the CUDA
# toolkit (nvcc, cudart, cuBLASLt), cuDNN 9 and NCCL; no GPU is needed to build. The public
# headers never see a CUDA type: the CUDA libraries are linked privately and only the
# definition DEVPIPE_HAVE_CUDA=1 is public.

# ---- locate nvcc: CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then PATH
if(NOT CMAKE_CUDA_COMPILER)
  set(_devpipe_cuda_hints)
  foreach(_var CUDA_HOME CUDA_PATH CUDAToolkit_ROOT)
    if(DEFINED ENV{${_var}} AND NOT "$ENV{${_var}}" STREQUAL "")
      list(APPEND _devpipe_cuda_hints "$ENV{${_var}}/bin")
    endif()
  endforeach()
  list(APPEND _devpipe_cuda_hints /usr/local/cuda/bin)
  find_program(_devpipe_nvcc NAMES nvcc HINTS ${_devpipe_cuda_hints})
  if(NOT _devpipe_nvcc)
    message(FATAL_ERROR
      "DEVPIPE_CUDA=ON but no CUDA toolkit was found: nvcc is not in $CUDA_HOME/bin, "
      "/usr/local/cuda/bin or PATH. Install the CUDA toolkit (12.x or 13.x, with cuBLASLt), "
      "cuDNN 9 and NCCL, set CUDA_HOME, or configure without -DDEVPIPE_CUDA=ON.")
  endif()
  set(CMAKE_CUDA_COMPILER "${_devpipe_nvcc}" CACHE FILEPATH "CUDA compiler" FORCE)
endif()
get_filename_component(_devpipe_cuda_bin "${CMAKE_CUDA_COMPILER}" DIRECTORY)
get_filename_component(_devpipe_cuda_root "${_devpipe_cuda_bin}" DIRECTORY)
if(NOT CUDAToolkit_ROOT)
  set(CUDAToolkit_ROOT "${_devpipe_cuda_root}")
endif()

# Hopper only (H100/H200): keeps the nvcc builds short. Override with
# -DCMAKE_CUDA_ARCHITECTURES=... for other GPUs.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES 90)
endif()
if(NOT CMAKE_CUDA_HOST_COMPILER)
  set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}")
endif()

enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
if(NOT TARGET CUDA::cudart OR NOT TARGET CUDA::cublasLt)
  message(FATAL_ERROR "DEVPIPE_CUDA=ON: the CUDA toolkit at ${CUDAToolkit_LIBRARY_DIR} lacks cudart or cuBLASLt")
endif()

# ---- cuDNN 9 and NCCL (headers and libraries, next to the toolkit or on the system)
set(_devpipe_cuda_lib_dirs ${CUDAToolkit_LIBRARY_DIR} ${_devpipe_cuda_root}/lib64
    ${_devpipe_cuda_root}/lib /usr/local/cuda/lib64)
set(_devpipe_cuda_inc_dirs ${CUDAToolkit_INCLUDE_DIRS} ${_devpipe_cuda_root}/include
    /usr/local/cuda/include)
find_library(DEVPIPE_CUDNN_LIBRARY NAMES cudnn HINTS ${_devpipe_cuda_lib_dirs})
find_path(DEVPIPE_CUDNN_INCLUDE_DIR NAMES cudnn.h HINTS ${_devpipe_cuda_inc_dirs})
find_library(DEVPIPE_NCCL_LIBRARY NAMES nccl HINTS ${_devpipe_cuda_lib_dirs})
find_path(DEVPIPE_NCCL_INCLUDE_DIR NAMES nccl.h HINTS ${_devpipe_cuda_inc_dirs})
foreach(_v DEVPIPE_CUDNN_LIBRARY DEVPIPE_CUDNN_INCLUDE_DIR DEVPIPE_NCCL_LIBRARY DEVPIPE_NCCL_INCLUDE_DIR)
  if(NOT ${_v})
    message(FATAL_ERROR
      "DEVPIPE_CUDA=ON: ${_v} not found (looked in ${_devpipe_cuda_lib_dirs} and "
      "${_devpipe_cuda_inc_dirs}); the cuda backend needs cuDNN 9 and NCCL")
  endif()
endforeach()
if(EXISTS "${DEVPIPE_CUDNN_INCLUDE_DIR}/cudnn_version.h")
  file(STRINGS "${DEVPIPE_CUDNN_INCLUDE_DIR}/cudnn_version.h" _cudnn_major REGEX "#define CUDNN_MAJOR [0-9]+")
  string(REGEX MATCH "[0-9]+" _cudnn_major "${_cudnn_major}")
  if(_cudnn_major AND _cudnn_major LESS 9)
    message(FATAL_ERROR "DEVPIPE_CUDA=ON: cuDNN ${_cudnn_major} found in ${DEVPIPE_CUDNN_INCLUDE_DIR}; need cuDNN 9")
  endif()
endif()

# ---- sources
file(GLOB DEVPIPE_CUDA_SOURCES CONFIGURE_DEPENDS
  ${PROJECT_SOURCE_DIR}/src/backends/cuda/*.cpp ${PROJECT_SOURCE_DIR}/src/backends/cuda/*.cu)
target_sources(devpipe PRIVATE ${DEVPIPE_CUDA_SOURCES})
# `devpipe` was created before the CUDA language was enabled: set its CUDA properties here.
set_target_properties(devpipe PROPERTIES
  CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_EXTENSIONS OFF
  CUDA_SEPARABLE_COMPILATION OFF)

# The target's warning flags were written for the C++ compiler; nvcc rejects -Wall/-Wextra, so
# restrict every existing option to C++ and pass the warnings to nvcc's host compiler instead.
get_target_property(_devpipe_opts devpipe COMPILE_OPTIONS)
if(_devpipe_opts)
  set(_devpipe_cxx_opts)
  foreach(_o IN LISTS _devpipe_opts)
    list(APPEND _devpipe_cxx_opts "$<$<COMPILE_LANGUAGE:CXX>:${_o}>")
  endforeach()
  set_property(TARGET devpipe PROPERTY COMPILE_OPTIONS ${_devpipe_cxx_opts})
endif()
target_compile_options(devpipe PRIVATE
  "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-Xcompiler -Wall,-Wextra,-Wno-unused-parameter>")

target_include_directories(devpipe PRIVATE ${DEVPIPE_CUDNN_INCLUDE_DIR} ${DEVPIPE_NCCL_INCLUDE_DIR})
target_compile_definitions(devpipe PUBLIC DEVPIPE_HAVE_CUDA=1)
target_link_libraries(devpipe PRIVATE CUDA::cudart CUDA::cublasLt ${DEVPIPE_CUDNN_LIBRARY}
                      ${DEVPIPE_NCCL_LIBRARY})

message(STATUS "devpipe: cuda backend ON (CUDA ${CUDAToolkit_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES}, "
               "cuDNN ${DEVPIPE_CUDNN_LIBRARY}, NCCL ${DEVPIPE_NCCL_LIBRARY})")
