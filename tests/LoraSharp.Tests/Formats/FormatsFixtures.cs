using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;

namespace LoraSharp.Tests.Formats;

/// <summary>Target-model module indexes and manifest cases of the reference sets, for data-driven tests.</summary>
public static class FormatsFixtures
{
    static readonly Lazy<ModuleIndex> sd = new(() => IndexOf(
        ("unet.", Path.Combine("sd", "model", "diffusers", "unet", "diffusion_pytorch_model.safetensors")),
        ("text_encoder.", Path.Combine("sd", "model", "diffusers", "text_encoder", "model.safetensors"))));

    static readonly Lazy<ModuleIndex> llm = new(() => IndexOf(("", Path.Combine("llm", "model", "model.safetensors"))));

    public static ModuleIndex SdIndex => sd.Value;

    public static ModuleIndex LlmIndex => llm.Value;

    static ModuleIndex IndexOf(params (string Prefix, string RelativePath)[] parts)
        => ModuleIndex.Combine(parts.Select(p =>
        {
            using var file = SafetensorsFile.Open(ReferenceData.PathOf(p.RelativePath));
            return ModuleIndex.FromStateDict(file.Keys.Select(k => new KeyValuePair<string, long[]>(k, file.Info(k).Shape)), p.Prefix);
        }).ToArray());

    public static JsonObject Manifest(string set)
        => (JsonObject)ReferenceData.ReadJson(set, "manifest.json");

    /// <summary>Names of the SD LoRA cases in sd/manifest.json.</summary>
    public static TheoryData<string> SdLoraCases()
    {
        var data = new TheoryData<string>();
        foreach (var c in Manifest("sd")["loras"]!.AsArray()) data.Add(c!["name"]!.GetValue<string>());
        return data;
    }

    public static JsonObject SdLora(string name)
        => Manifest("sd")["loras"]!.AsArray().Select(n => n!.AsObject()).Single(n => n["name"]!.GetValue<string>() == name);

    /// <summary>Names of the PEFT adapter cases in llm/manifest.json.</summary>
    public static TheoryData<string> LlmAdapterCases()
    {
        var data = new TheoryData<string>();
        foreach (var c in Manifest("llm")["adapters"]!.AsArray()) data.Add(c!["name"]!.GetValue<string>());
        return data;
    }

    public static JsonObject LlmAdapter(string name)
        => Manifest("llm")["adapters"]!.AsArray().Select(n => n!.AsObject()).Single(n => n["name"]!.GetValue<string>() == name);

    public static string SdPath(string relative) => ReferenceData.PathOf("sd", relative);

    public static string LlmPath(string relative) => ReferenceData.PathOf("llm", relative);
}
