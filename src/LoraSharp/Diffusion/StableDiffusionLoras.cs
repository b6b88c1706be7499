using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.Models.StableDiffusion;

namespace LoraSharp.Diffusion;

/// <summary>
/// Adapter files on a <see cref="StableDiffusionModel"/>: the module index (every Linear / Conv2d of the UNet and text
/// encoders under <c>unet.</c>, <c>text_encoder.</c>, <c>text_encoder_2.</c>, plus the UNet's ldm/SGM names as aliases, so
/// kohya SDXL files — <c>lora_unet_input_blocks_4_1_…</c> — and SD1 files written with ldm names resolve), reading with
/// coverage and base checks, attaching with the A1111 te/unet multiplier split, and the kohya names to write back.
/// </summary>
public static class StableDiffusionLoras
{
    public const string TextEncoderPrefix = "text_encoder.";
    public const string TextEncoder2Prefix = "text_encoder_2.";
    public const string UNetPrefix = "unet.";

    /// <summary>The modules adapters may target (the VAE is never adapted by LoRA tools).</summary>
    public static ModuleIndex IndexOf(StableDiffusionModel model)
    {
        var modules = ModuleIndex.AdaptableModules(model).Where(p => !p.Key.StartsWith("vae.", StringComparison.Ordinal)).ToList();
        var map = LdmKeyMap.ForUNet(model.Config.Unet);
        var aliases = new List<KeyValuePair<string, string>>();
        foreach (var (path, _) in modules)
        {
            if (!path.StartsWith(UNetPrefix, StringComparison.Ordinal)) continue;
            var ldm = map.ToLdm(path[UNetPrefix.Length..]);
            if (ldm is not null && ldm != path[UNetPrefix.Length..]) aliases.Add(new(UNetPrefix + ldm, path));
        }
        return ModuleIndex.FromShapes(modules, aliases);
    }

    /// <summary>Reads an adapter file onto the model's modules (errors on unmatched keys unless lenient).</summary>
    public static AdapterLoadResult Read(StableDiffusionModel model, string path, bool lenient = false)
        => AdapterFile.Read(path, IndexOf(model), new AdapterReadOptions { Lenient = lenient });

    /// <summary>
    /// Reads and attaches an adapter at A1111's multipliers: <paramref name="textEncoder"/> for modules under the text
    /// encoders, <paramref name="unet"/> (default: the text encoder's) for the UNet.
    /// </summary>
    public static AttachedAdapter Attach(AdapterHost host, StableDiffusionModel model, string path, string name,
        double textEncoder = 1, double? unet = null, bool lenient = false)
    {
        using var loaded = Read(model, path, lenient);
        var attached = host.Attach(loaded.Weights, name, 1, new AttachOptions { Lenient = lenient });
        SetMultipliers(attached, textEncoder, unet ?? textEncoder);
        return attached;
    }

    /// <summary>A1111 routing: text-encoder modules (both encoders) get <paramref name="textEncoder"/>, the rest <paramref name="unet"/>.</summary>
    public static void SetMultipliers(AttachedAdapter adapter, double textEncoder, double unet)
    {
        adapter.Multiplier = 1;
        adapter.ModuleWeight = null;
        adapter.ComponentMultipliers = new Dictionary<string, double>
        {
            [TextEncoderPrefix] = textEncoder,
            [TextEncoder2Prefix] = textEncoder,
            [UNetPrefix] = unet,
        };
    }

    /// <summary>
    /// The kohya name of a module path for this model's family: SDXL UNet modules use their SGM paths
    /// (<c>lora_unet_input_blocks_4_1_…</c>), SDXL text encoders <c>lora_te1_</c> / <c>lora_te2_</c>; SD1/SD2 use diffusers
    /// names (<c>lora_unet_down_blocks_0_…</c>, <c>lora_te_</c>), as kohya sd-scripts writes them.
    /// </summary>
    public static Func<string, string?> KohyaNameOf(StableDiffusionModel model)
    {
        bool sdxl = model.TextEncoder2 is not null;
        var map = LdmKeyMap.ForUNet(model.Config.Unet);
        return path =>
        {
            if (sdxl && path.StartsWith(UNetPrefix, StringComparison.Ordinal))
            {
                var sgm = map.ToLdm(path[UNetPrefix.Length..]);
                return sgm is null ? null : "lora_unet_" + sgm.Replace('.', '_');
            }
            return KohyaAdapterWriter.KohyaName(path, sdxl);
        };
    }
}
