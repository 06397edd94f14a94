# KdfusedCuda.cmake -- find the CUDA toolkit the way setup.py does, and prepare a CUDA build of
# PyTorch (pip wheel) for find_package(Torch). Functions only; CMakeLists.txt decides what to call.
#
# Why: torch's CMake config (Caffe2/public/cuda.cmake) locates CUDA with the old FindCUDA, which
# guesses the toolkit root from the nvcc on PATH -- wrong when nvcc is a wrapper script outside the
# toolkit -- and expects every CUDA library and header (nvrtc, cublas, cusparse.h, ...) inside the
# toolkit, while a pip torch gets them from the `nvidia` pip packages it depends on.

# kdfused_find_cuda_toolkit(<root_var> <nvcc_var>)
# The toolkit root and its nvcc, or "" when there is none. Honours, in order: CUDAToolkit_ROOT,
# CMAKE_CUDA_COMPILER, $CUDACXX, $CUDA_HOME, $CUDA_PATH, nvcc on PATH. The root comes from nvcc
# itself (`nvcc --dryrun` prints TOP=<root>), like setup.py's find_cuda_home().
function(kdfused_find_cuda_toolkit root_var nvcc_var)
  set(nvcc "")
  if(CUDAToolkit_ROOT AND EXISTS "${CUDAToolkit_ROOT}/bin/nvcc")
    set(nvcc "${CUDAToolkit_ROOT}/bin/nvcc")
  elseif(CMAKE_CUDA_COMPILER)
    set(nvcc "${CMAKE_CUDA_COMPILER}")
  elseif(DEFINED ENV{CUDACXX} AND NOT "$ENV{CUDACXX}" STREQUAL "")
    set(nvcc "$ENV{CUDACXX}")
  else()
    foreach(var CUDA_HOME CUDA_PATH)
      if(NOT nvcc AND DEFINED ENV{${var}} AND EXISTS "$ENV{${var}}/bin/nvcc")
        set(nvcc "$ENV{${var}}/bin/nvcc")
      endif()
    endforeach()
    if(NOT nvcc)
      find_program(KDFUSED_NVCC_ON_PATH nvcc)
      if(KDFUSED_NVCC_ON_PATH)
        set(nvcc "${KDFUSED_NVCC_ON_PATH}")
      endif()
    endif()
  endif()
  set(root "")
  if(CUDAToolkit_ROOT)
    set(root "${CUDAToolkit_ROOT}")
  elseif(nvcc)
    execute_process(COMMAND "${nvcc}" --dryrun -x cu -c /dev/null -o /dev/null
                    OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
    if("${out}\n${err}" MATCHES "#\\$ TOP=([^\r\n]*)")
      string(STRIP "${CMAKE_MATCH_1}" root)
    else()
      get_filename_component(root "${nvcc}" REALPATH)
      get_filename_component(root "${root}" DIRECTORY)
      get_filename_component(root "${root}" DIRECTORY)
    endif()
  endif()
  if(root)
    get_filename_component(root "${root}" REALPATH)
    if(EXISTS "${root}/bin/nvcc")
      set(nvcc "${root}/bin/nvcc")  # the real compiler, not a wrapper: CMake and FindCUDA agree
    endif()
  endif()
  if(NOT root OR NOT EXISTS "${root}/include/cuda_runtime.h" OR NOT nvcc)
    set(root "")
    set(nvcc "")
  endif()
  set(${root_var} "${root}" PARENT_SCOPE)
  set(${nvcc_var} "${nvcc}" PARENT_SCOPE)
endfunction()

# kdfused_pip_cuda_libraries(<toolkit_root> <nvidia_dirs>)
# For each CUDA library that only the `nvidia` pip packages have (libnvrtc.so.13, libcublas.so.13,
# ... without an unversioned .so link, which find_library needs), preset the cache variable
# CUDA_<name>_LIBRARY that both FindCUDA and FindCUDAToolkit read, to the versioned file.
function(kdfused_pip_cuda_libraries toolkit_root nvidia_dirs)
  set(names "")
  foreach(dir IN LISTS nvidia_dirs)
    file(GLOB libs "${dir}/*/lib/lib*.so.*")
    list(SORT libs)
    foreach(lib IN LISTS libs)
      get_filename_component(file "${lib}" NAME)
      if(NOT file MATCHES "^lib([A-Za-z0-9_]+)\\.so\\.[0-9]+$")
        continue()
      endif()
      set(name "${CMAKE_MATCH_1}")
      if(DEFINED CUDA_${name}_LIBRARY OR EXISTS "${toolkit_root}/lib64/lib${name}.so"
         OR EXISTS "${toolkit_root}/lib/lib${name}.so")
        continue()
      endif()
      set(CUDA_${name}_LIBRARY "${lib}" CACHE FILEPATH "CUDA ${name} library (from the nvidia pip packages)")
      list(APPEND names "${name}")
    endforeach()
  endforeach()
  if(names)
    list(JOIN names " " names)
    message(STATUS "kdfused: CUDA libraries taken from the nvidia pip packages: ${names}")
  endif()
endfunction()

# kdfused_cuda_include_shim(<out_var> <toolkit_root> <nvidia_dirs> <shim_dir>)
# Headers such as cusparse.h, which torch's CUDA headers include, may exist only in the nvidia pip
# packages. Links just the ones missing from the toolkit into <shim_dir> (so nothing of the
# toolkit's is shadowed), as setup.py does; <out_var> is the folder, or "" when nothing was missing.
function(kdfused_cuda_include_shim out_var toolkit_root nvidia_dirs shim_dir)
  file(REMOVE_RECURSE "${shim_dir}")
  file(MAKE_DIRECTORY "${shim_dir}")
  set(added 0)
  foreach(dir IN LISTS nvidia_dirs)
    file(GLOB incs LIST_DIRECTORIES true "${dir}/*/include")
    list(SORT incs)
    foreach(inc IN LISTS incs)
      if(NOT IS_DIRECTORY "${inc}")
        continue()
      endif()
      file(GLOB entries LIST_DIRECTORIES true RELATIVE "${inc}" "${inc}/*")
      foreach(name IN LISTS entries)
        if(NOT EXISTS "${toolkit_root}/include/${name}" AND NOT EXISTS "${shim_dir}/${name}"
           AND NOT IS_SYMLINK "${shim_dir}/${name}")
          file(CREATE_LINK "${inc}/${name}" "${shim_dir}/${name}" SYMBOLIC)
          math(EXPR added "${added} + 1")
        endif()
      endforeach()
    endforeach()
  endforeach()
  if(added GREATER 0)
    message(STATUS "kdfused: ${added} CUDA headers from the nvidia pip packages linked into ${shim_dir}")
    set(${out_var} "${shim_dir}" PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

# kdfused_torch_arch_list(<out_var> <cmake_architectures>)
# CMake architectures ("80;90", "90a", "86-real") -> TORCH_CUDA_ARCH_LIST ("8.0;9.0", ...), which is
# what torch's CMake config uses (it ignores CMAKE_CUDA_ARCHITECTURES). As with setup.py's
# TORCH_CUDA_ARCH_LIST, "80" means SASS for sm_80 only; "80-virtual" adds PTX ("8.0+PTX").
function(kdfused_torch_arch_list out_var archs)
  set(result "")
  foreach(a IN LISTS archs)
    if(a MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
      set(v "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      if(CMAKE_MATCH_4 STREQUAL "-virtual")
        string(APPEND v "+PTX")
      endif()
      list(APPEND result "${v}")
    else()
      message(FATAL_ERROR "kdfused: cannot translate CUDA architecture '${a}' for torch; pass "
                          "-DTORCH_CUDA_ARCH_LIST=... (e.g. \"8.0;9.0\") instead")
    endif()
  endforeach()
  set(${out_var} "${result}" PARENT_SCOPE)
endfunction()
