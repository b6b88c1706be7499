// LoraSharp benchmarks: `dotnet run -c Release --project bench/LoraSharp.Bench -- <name> [options]`.
// Each benchmark is one static class with Run(string[] args) returning an exit code.
var benchmarks = new Dictionary<string, (string Description, Func<string[], int> Run)>(StringComparer.OrdinalIgnoreCase)
{
    ["io"] = ("tensor file loading vs a plain sequential read (safetensors and torch .ckpt, ~1 GB each)", LoraSharp.Bench.IoBenchmark.Run),
    ["llama"] = ("LLaMA prefill and decode tokens/s, ~110M-parameter random model, float32 and bfloat16", LoraSharp.Bench.LlamaBenchmark.Run),
    ["unet"] = ("SD1.5 UNet forward at 64x64 latents, random weights, f32 and bf16", LoraSharp.Bench.UNetBenchmark.Run),
    ["adapters"] = ("LoRA r=16 overhead: train step unmerged vs base, merged inference vs base, merge+unmerge of 100 layers", LoraSharp.Bench.AdaptersBenchmark.Run),
    ["txt2img"] = ("s/step at 512x512, SD1.5 config random weights, f32/bf16, 0/1/3 rank-16 LoRAs unmerged vs merged", LoraSharp.Bench.Txt2ImgBenchmark.Run),
    ["tools"] = ("merge / extract / resize on a random SD1.5-sized fp16 file with a rank-128 LoRA: time, peak RSS, vs full SVD", LoraSharp.Bench.ToolsBenchmark.Run),
};

if (args.Length == 0 || !benchmarks.TryGetValue(args[0], out var bench))
{
    Console.Error.WriteLine("usage: LoraSharp.Bench <benchmark> [options]");
    foreach (var (name, (description, _)) in benchmarks)
        Console.Error.WriteLine($"  {name,-8} {description}");
    return args.Length == 0 ? 1 : 2;
}
return bench.Run(args[1..]);
